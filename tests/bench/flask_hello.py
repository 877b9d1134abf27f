"""The Flask hello the benchmark serves with gunicorn: what a Python guest replaces."""

from flask import Flask

app = Flask(__name__)


@app.get("/")
def hello():
    return "Hello from Flask\n", 200, {"content-type": "text/plain"}
