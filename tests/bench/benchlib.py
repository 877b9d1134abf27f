"""What the Python benchmarks under tests/bench share: where things are, the Procfile's flags,
the host's process tree and its memory, the machine, and the backends they start (a fresh
PostgreSQL database, a fresh moto S3 API server). Imported by tests/bench/lenzeye and
tests/bench/soak, which run as scripts from this directory's parent, so `import benchlib` finds it.
"""

import hashlib
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOST = os.path.join(ROOT, "target/release/host")
MOTO = os.path.join(ROOT, "target/s3-server/bin/moto_server")
POSTGRES = "postgres://postgres@127.0.0.1:5432"
MIB = 1 << 20
# What the host gets beyond the Procfile: the seed's 512 MB plan as a budget, which four workers
# fit with 11 MiB an instance (the host prints the arithmetic).
BUDGET_MIB = 512
HOST_FLAGS = [f"--memory-budget={BUDGET_MIB}MiB", "--memory-limit=11MiB", "--part-buffer=10MiB"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def procfile_flags():
    """The Procfile's flags but for the bind and the worker count, which each run sets."""
    line = open(os.path.join(ROOT, "Procfile")).read().strip()
    words = shlex.split(line.removeprefix("web: "))
    return [word for word in words[3:] if not word.startswith(("--bind", "--workers"))]


def children(parent):
    """The pids whose parent is `parent`."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if stat.rsplit(")", 1)[1].split()[1] == str(parent):
                pids.append(int(entry))
    return pids


def server_processes(master):
    """The master and its children (the workers)."""
    return [master] + children(master)


def memory_kib(master, pids=None):
    """(summed RSS, summed PSS) of the master and its workers (or of `pids`), in KiB."""
    rss = pss = 0
    for pid in pids if pids is not None else server_processes(master):
        try:
            for line in open(f"/proc/{pid}/smaps_rollup"):
                field, value = line.split(":", 1)
                if field == "Rss":
                    rss += int(value.split()[0])
                elif field == "Pss":
                    pss += int(value.split()[0])
        except OSError:
            pass
    return rss, pss


def cpu_seconds(master):
    """CPU time of the master and its workers, with that of workers that already exited."""
    ticks = 0
    for pid in server_processes(master):
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # utime, stime; and for the master cutime, cstime (its reaped workers).
        ticks += int(fields[11]) + int(fields[12])
        if pid == master:
            ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def machine():
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), platform.processor())
    return f"{model}, {os.cpu_count()} cores; kernel {platform.release()}"


def psql(database, sql):
    subprocess.run(["psql", f"{POSTGRES}/{database}", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql],
                   check=True, stdout=subprocess.DEVNULL)


def psql_rows(database, sql):
    """The rows of a query, each a list of its fields as text."""
    out = subprocess.run(["psql", f"{POSTGRES}/{database}", "-AtF", "\t", "-v", "ON_ERROR_STOP=1", "-c", sql],
                         check=True, capture_output=True, text=True).stdout
    return [line.split("\t") for line in out.splitlines() if line]


def fresh_database(stack, name):
    """A database of this run's own, dropped afterwards with the role the host made for it."""
    psql("postgres", f"CREATE DATABASE {name}")

    def drop():
        psql("postgres", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        # The host names an app's role host_app_<app>_<first 4 bytes of SHA-256(database)>.
        suffix = hashlib.sha256(name.encode()).hexdigest()[:8]
        roles = subprocess.run(["psql", f"{POSTGRES}/postgres", "-Atc",
                                f"SELECT rolname FROM pg_roles WHERE rolname LIKE 'host\\_app\\_%\\_{suffix}'"],
                               check=True, capture_output=True, text=True).stdout.split()
        for role in roles:
            psql("postgres", f"DROP ROLE {role}")

    stack.callback(drop)


def busy_ticks():
    """(busy, all) clock ticks of every core since boot, from /proc/stat: over an interval, the
    share of the machine's cores that were working, whoever for."""
    fields = [int(field) for field in open("/proc/stat").readline().split()[1:]]
    # user nice system idle iowait irq softirq steal: idle and iowait are the unused time.
    return sum(fields[:8]) - fields[3] - fields[4], sum(fields[:8])


def s3_server(stack, log, bucket="bench"):
    """A fresh moto server with the bucket `bucket`; its endpoint."""
    return start_s3_server(stack, log, bucket)[0]


def start_s3_server(stack, log, bucket="bench"):
    """A fresh moto server with the bucket `bucket`: its endpoint and its process."""
    port = free_port()
    moto = subprocess.Popen([MOTO, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    stack.callback(lambda: (moto.terminate(), moto.wait()))
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/{bucket}", method="PUT"))
            return f"http://127.0.0.1:{port}", moto
        except OSError:
            if moto.poll() is not None or time.time() > deadline:
                sys.exit("the S3 API server did not start")
            time.sleep(0.1)
