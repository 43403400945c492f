from fedaug.cli import main

main()
