from vmwatch.cli.app import main

main()
