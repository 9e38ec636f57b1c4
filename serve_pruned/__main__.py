from serve_pruned.cli.main import main

main()
