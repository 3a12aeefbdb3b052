from rayalign.cli import main

main()
