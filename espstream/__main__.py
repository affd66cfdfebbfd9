from espstream.cli import main

main()
