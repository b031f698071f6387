from shoal_cri_gateway.main import main

main()
