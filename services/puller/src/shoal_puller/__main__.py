from shoal_puller.main import main

main()
