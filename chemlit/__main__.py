from chemlit.cli import main

main()
