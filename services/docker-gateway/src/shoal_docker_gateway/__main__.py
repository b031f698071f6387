from shoal_docker_gateway.main import main

main()
