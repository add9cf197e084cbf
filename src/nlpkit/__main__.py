from nlpkit.cli import app

app()
