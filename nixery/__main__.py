from nixery.cli import main

main()
