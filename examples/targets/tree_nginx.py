"""nginx (Debian's nginx-light) as a master with two workers, confined to one directory:
writes DIR/nginx.conf and DIR/www/index.html, then execs nginx in the foreground (the
master keeps this process's pid). It listens on 127.0.0.1:PORT; its pid file, logs and
temp directories are all in DIR; the workers run as root (DIR may be root's only).

usage: tree_nginx.py DIR PORT
"""

from __future__ import annotations

import os
import shutil
import sys

CONF = """\
daemon off;
master_process on;
worker_processes 2;
user root;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {dir}/www;
        location / {{ }}
    }}
}}
"""

PAGE = "hello from a restored nginx\n"


def main() -> None:
    where, port = os.path.abspath(sys.argv[1]), int(sys.argv[2])
    os.makedirs(f"{where}/www", exist_ok=True)
    os.makedirs(f"{where}/tmp", exist_ok=True)
    with open(f"{where}/www/index.html", "w") as f:
        f.write(PAGE)
    with open(f"{where}/nginx.conf", "w") as f:
        f.write(CONF.format(dir=where, port=port))
    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    os.execv(exe, [exe, "-p", where, "-c", f"{where}/nginx.conf", "-e", f"{where}/error.log"])


if __name__ == "__main__":
    main()
