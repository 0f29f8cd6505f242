"""The baseline for benchmarks/burst.py: batchspawner 1.3's stock SlurmSpawner, reached
over ``ssh`` as its ``exec_prefix``, set up the way the 2019 deployment did (environment
passed with ``env VAR=...`` on the ssh command line, one shared tunnel key in the job
script).  Only what a tunnelled deployment cannot do without is changed: the server's
address is the hub side of the tunnel."""

from __future__ import annotations

from batchspawner import SlurmSpawner
from traitlets import default


class BaselineSlurmSpawner(SlurmSpawner):
    def state_gethost(self) -> str:
        return "127.0.0.1"  # the job's tunnel listens on the hub's loopback

    @default("req_homedir")
    def _req_homedir_default(self) -> str:
        return "/home/gateway"  # hub users have no account on the hub: the gateway's home

    def user_env(self, env: dict) -> dict:
        env.update(USER="gateway", HOME="/home/gateway", SHELL="/bin/bash")
        return env


FREE_PORT = "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
WAIT_PORT = "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1)"
POST_PORT = (
    "import json,os,sys,urllib.request as u; "
    "u.urlopen(u.Request(os.environ['JUPYTERHUB_API_URL'] + '/batchspawner', "
    "data=json.dumps({'port': int(sys.argv[1])}).encode(), method='POST', "
    "headers={'Authorization': 'token ' + os.environ['JUPYTERHUB_API_TOKEN'], "
    "'Content-Type': 'application/json'}))"
)


def config(info, key_pem: str, job_env: str) -> str:
    """Config lines (after xsedehub's apply) that switch the hub to the baseline."""
    ssh = (
        f"ssh -F /dev/null -i {info.gateway_key} -o BatchMode=yes -o IdentitiesOnly=yes "
        f"-o UserKnownHostsFile={info.known_hosts} -o StrictHostKeyChecking=yes "
        f"{info.gateway_user}@{info.login_ip}"
    )
    py = f"{job_env}/bin/python"
    script = f"""#!/bin/bash
#SBATCH --output={{{{homedir}}}}/bench-baseline-{{{{username}}}}.log
#SBATCH --job-name=baseline-{{{{username}}}}
#SBATCH --partition=compute
#SBATCH --time=01:00:00
#SBATCH --mem=512M
#SBATCH --chdir={{{{homedir}}}}
#SBATCH --export={{{{keepvars}}}}
KEY=$(mktemp)
cat > "$KEY" <<'XHKEY'
{key_pem.strip()}
XHKEY
chmod 600 "$KEY"
PORT=$({py} -c "{FREE_PORT}")
APIPORT=$({py} -c "{FREE_PORT}")
( while :; do ssh -N -F /dev/null -i "$KEY" -o BatchMode=yes -o IdentitiesOnly=yes \\
    -o UserKnownHostsFile={info.known_hosts} -o StrictHostKeyChecking=yes \\
    -o ExitOnForwardFailure=yes -o ServerAliveInterval=5 \\
    -R 127.0.0.1:$PORT:127.0.0.1:$PORT -L 127.0.0.1:$APIPORT:127.0.0.1:{info.hub_api_port} \\
    {info.tunnel_user}@{info.hub_ip} </dev/null; sleep 2; done ) &
for i in $(seq 300); do {py} -c "{WAIT_PORT}" $APIPORT 2>/dev/null && break; sleep 0.2; done
export JUPYTERHUB_API_URL=http://127.0.0.1:$APIPORT/hub/api
export JUPYTERHUB_ACTIVITY_URL=$JUPYTERHUB_API_URL/users/{{{{username}}}}/activity
{py} -c "{POST_PORT}" $PORT
export JUPYTERHUB_SERVICE_URL=http://127.0.0.1:$PORT/user/{{{{username}}}}/
{job_env}/bin/jupyterhub-singleuser
"""
    env_words = (
        "{% for var in keepvars.split(',') %}{{var}}=\\\"'\\\"${{ '{' }}{{var}}{{ '}' }}\\\"'\\\" "
        "{% endfor %}"
    )
    return f'''
c.JupyterHub.spawner_class = "xh_bench_baseline.BaselineSlurmSpawner"
_b = c.BaselineSlurmSpawner
_b.exec_prefix = {ssh!r}
_b.batch_submit_cmd = "env {env_words}sbatch --parsable"
_b.batch_query_cmd = "squeue -h -j {{job_id}} -o \\"'%T %B'\\""
_b.batch_cancel_cmd = "scancel {{job_id}}"
_b.batch_script = {script!r}
_b.req_srun = ""
_b.cmd = ["{job_env}/bin/jupyterhub-singleuser"]
_b.start_timeout = 300
_b.http_timeout = 300
_b.poll_interval = 10
'''
