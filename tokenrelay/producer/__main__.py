from tokenrelay.producer.cli import main

main()
