from ..commands.eval import main

main()
