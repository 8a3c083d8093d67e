"""Connect to Ray: a local cluster with the dashboard on loopback by default, or an existing cluster.

The dashboard can submit jobs, i.e. run code on the machine, and has no user accounts: its only guard is
Ray's token (on by default for new local clusters in Ray 2.60, off with `RAY_AUTH_MODE=disabled`). So it binds
to 127.0.0.1 unless the user asks for another host, and then we say loudly who can reach it. With token
authentication on, the page first asks for the token; we print where to get it next to the URL.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
import urllib.request

import ray

from lcsc_ray import stopping
from lcsc_ray.stack import available_host_bytes
from lcsc_ray.search.ray_compat import driver_keeps_sigterm_handler, tune_actor_env_vars, tune_actors_use_idle_workers

LOOPBACK_HOSTS = {"localhost"}
# What a trial's worker imports before it can score: torch, Tune's trainable, the scorer, the model registry, the
# demo's feature extractor and the loader of the digits it is keyed by (scikit-learn: 1 s of imports in a trial's
# scorer build otherwise). A local cluster's idle workers import them as they start (`start_ray`).
TRIAL_MODULES = ("lcsc_ray.search.trial", "lcsc_ray.models", "lcsc_ray.run_formats", "lcsc_ray.features.digits",
                 "sklearn.datasets")
# An idle worker with them imported: 375 MiB of its own (USS) measured without sklearn.datasets, which adds 53 MiB
PRELOAD_BYTES_PER_WORKER = 430 << 20
PRELOAD_MEMORY_SHARE = 0.1  # of the available memory, the most all of a node's preloaded idle workers may hold


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def start_ray(
    address: str | None = None,
    *,
    dashboard: bool = True,
    dashboard_host: str = "127.0.0.1",
    dashboard_port: int = 8265,
    quiet: bool = False,
) -> str | None:
    """Start (or join, with `address`) Ray and return the dashboard URL when there is one.

    Workers must not change into their trial folder (`RAY_CHDIR_TO_TRIAL_DIR=0`): every path we hand them
    is absolute, and relative paths typed by the user keep meaning what they meant in the shell.

    A local cluster gets no job runtime environment: its workers inherit the driver's environment, where
    that variable is set, and Ray starts one idle worker per CPU at `ray.init` that imports `TRIAL_MODULES`
    at once where that fits in memory (Ray's `preload_python_modules`, `preload_fits`). A trial's actor then
    takes one of those workers (`ray_compat.tune_actors_use_idle_workers`) instead of starting a process and
    importing torch and our modules between Tune's start and the first trial (2-4 s on a small machine). Ray only hands an actor an
    idle worker whose runtime environment is the default one, so setting the variable through a runtime
    environment, as for an existing cluster, ruled that out.
    """
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    if ray.is_initialized():
        return None
    # Workers import lcsc_ray and search_spaces from the installed package: on a multi-node cluster every node
    # runs the same environment (`pip install -r requirements.txt`), like the same path for the checkpoints.
    runtime_env = {"env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0"}}
    tune_actors_use_idle_workers(None)
    if address:
        # Dashboard flags belong to `ray start --head` on an existing cluster; Ray ignores them here.
        with driver_keeps_sigterm_handler():
            context = ray.init(address=address, runtime_env=runtime_env, log_to_driver=not quiet)
    else:
        local = not os.environ.get("RAY_ADDRESS")  # set in a `ray job submit` driver: an existing cluster
        if local:
            for name, value in tune_actor_env_vars().items():  # what Tune would set: the workers inherit it
                os.environ.setdefault(name, value)
        if dashboard and not is_loopback(dashboard_host):
            print(
                f"warning: the Ray dashboard will listen on {dashboard_host}:{dashboard_port}; it has no user "
                "accounts, so anyone who can reach that port (and, unless RAY_AUTH_MODE=disabled, holds the Ray "
                "token) can submit jobs to this machine",
                file=sys.stderr,
            )
        # Only the driver hears a stop signal, with its own handler; it then stops the cluster.
        with stopping.shielded_children(), driver_keeps_sigterm_handler():
            context = ray.init(
                include_dashboard=dashboard,
                dashboard_host=dashboard_host,
                dashboard_port=dashboard_port if dashboard else None,
                log_to_driver=not quiet,
                **({"_system_config": local_system_config()} if local else {"runtime_env": runtime_env}),
            )
        if local:
            tune_actors_use_idle_workers(dict(os.environ))
    url = context.dashboard_url or None
    if url and not url.startswith("http"):
        url = f"http://{url}"
    if url and dashboard_auth_mode(url) == "token" and not quiet:
        print("note: token authentication is on; the Ray dashboard page asks for the token: paste the output "
              "of `ray get-auth-token` (the file ~/.ray/auth_token on the head node); REST calls need the header "
              "'Authorization: Bearer <token>'")
    return url


def preload_fits(num_cpus: int, available_bytes: int | None) -> bool:
    """Whether Ray's idle workers may import `TRIAL_MODULES` as they start: Ray starts one per CPU, and each
    then holds about `PRELOAD_BYTES_PER_WORKER` of its own, so only where all of them together take at most
    `PRELOAD_MEMORY_SHARE` of the memory available (a small machine; a 64-core node would spend ~24 GiB)."""
    return available_bytes is not None and num_cpus * PRELOAD_BYTES_PER_WORKER <= PRELOAD_MEMORY_SHARE * available_bytes


def local_system_config() -> dict[str, object]:
    """Ray's settings for a local cluster `start_ray` starts: its workers import `TRIAL_MODULES` as they start
    where that fits in memory (`preload_fits`), and run at the driver's priority (Ray runs them at niceness
    15 by default: on a machine shared with other jobs a trial then gets less CPU than the same work in a
    plain loop at the user's priority; `RAY_worker_niceness` in the environment still sets it)."""
    config: dict[str, object] = {}
    if preload_fits(len(os.sched_getaffinity(0)), available_host_bytes()):  # Ray starts one idle worker per CPU
        config["preload_python_modules"] = list(TRIAL_MODULES)
    if "RAY_worker_niceness" not in os.environ:
        config["worker_niceness"] = 0
    return config


def dashboard_auth_mode(url: str, timeout: float = 5.0) -> str | None:
    """The dashboard's authentication mode ('token' or 'disabled'), from the one endpoint Ray serves without
    a token (`/api/authentication_mode`); None when the dashboard does not answer."""
    try:
        with urllib.request.urlopen(f"{url}/api/authentication_mode", timeout=timeout) as response:
            return json.loads(response.read()).get("authentication_mode")
    except (OSError, ValueError):
        return None
