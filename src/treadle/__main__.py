from treadle.cli.main import main

main()
