from kvxferd.cli import main

main()
