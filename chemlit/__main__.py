"""``python -m chemlit fit|validate|test|predict ...`` (the LightningCLI, ``chemlit.cli``) or
``python -m chemlit pipeline ...`` (CPT -> SFT -> PPO -> test, ``chemlit.pipeline``, which runs the CLI).
The one place that knows both, so that neither imports the other's caller."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    if (sys.argv[1:] if argv is None else argv)[:1] == ["pipeline"]:
        from chemlit.pipeline import main as pipeline_main

        return pipeline_main((sys.argv[1:] if argv is None else argv)[1:])
    from chemlit.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    main()
