from shoal_executor.main import main

main()
