"""`python -m maskconver_deploy` runs the command line."""

from maskconver_deploy.cli import main

if __name__ == "__main__":
    main()
