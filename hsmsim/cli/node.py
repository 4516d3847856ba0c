"""`hsmsim node serve`: run one HSM node process (normally spawned by the daemon)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hsmsim import config as cfg


def register(subparsers: Any) -> None:
    node = subparsers.add_parser("node", help="HSM node processes (spawned by the daemon)")
    sub = node.add_subparsers(dest="node_command", metavar="SUBCOMMAND", required=True)
    serve = sub.add_parser("serve", help="run one HSM node: a SoftHSM2 token served over the "
                           "node protocol (docs/node-protocol.md)")
    serve.add_argument("--state", help="cluster state directory (default $HSMSIM_HOME or ./.hsmsim)")
    serve.add_argument("--hsm-id", required=True, help="HSM id, hsm-xxxxxxxxxxx")
    serve.add_argument("--az", required=True, help="availability zone, e.g. us-east-1a")
    serve.add_argument("--listen", required=True, help="unix:PATH or tcp:HOST:PORT")
    serve.add_argument("--cluster-secret-file", required=True, type=Path,
                       help="file holding the cluster secret (daemon authentication)")
    serve.add_argument("--init", choices=("new", "clone"),
                       help="first start only: new = first HSM of a new cluster (generates the "
                       "masking key); clone = waits for the masking key from another HSM")
    serve.add_argument("--config", type=Path, help="config file (default STATE/hsmsim.toml)")
    serve.add_argument("--tls-ca", type=Path, help="mutual TLS on a tcp: listener: the cluster "
                       "CA certificate clients must chain to (with --tls-cert and --tls-key)")
    serve.add_argument("--tls-cert", type=Path, help="this node's certificate (PEM)")
    serve.add_argument("--tls-key", type=Path, help="this node's private key (PEM)")
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from hsmsim.node.config import NodeConfig
    from hsmsim.node.process import NodeOptions, run

    environ = cfg.environ()
    state = cfg.state_dir(args.state, environ)
    file_data = cfg.load_file(args.config or state / cfg.CONFIG_FILE)
    config = cfg.resolve_section(NodeConfig, "node", file_data, environ)
    opts = NodeOptions(state=state, hsm_id=args.hsm_id, az=args.az, listen=args.listen,
                       cluster_secret_file=args.cluster_secret_file, init=args.init,
                       tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key)
    return run(opts, config)
