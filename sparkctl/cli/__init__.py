"""The Typer CLI: assembles the pieces; one error boundary turns errors into messages and exit codes."""
