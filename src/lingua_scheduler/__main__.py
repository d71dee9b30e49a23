from lingua_scheduler.cli import main

main()
