from zimage_server.cli import app

app(prog_name="zimage")
