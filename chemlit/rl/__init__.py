"""The pieces of the RL stage: PPO formulas (ppo_math), rewards, the harshness curriculum and the
KL controllers. The stage that puts them in order is chemlit.stages.ppo."""
