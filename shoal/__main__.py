from shoal.cli import run_command

run_command()
