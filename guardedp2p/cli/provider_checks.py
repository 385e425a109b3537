"""What ``provider serve`` checks before it loads the model, and what ``--dry-run`` prints.

Why: loading the model takes from seconds to minutes, and a provider used to find a wrong ``--keys``, an empty
``--allow`` file or a port in use only afterwards. Everything here reads small files or the model's
``config.json`` and nothing more (issue 21).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from guardedp2p.errors import ConfigError


def probe_bind(endpoint: str) -> None:
    """Fail now, with the readable reason, if ``endpoint`` (``tcp://HOST:PORT``) cannot be bound by this process."""
    from guardedp2p.transport.endpoints import bind_error, check_endpoint

    check_endpoint(endpoint, "bind")
    if not endpoint.startswith("tcp://"):
        return
    host, _, port = endpoint[len("tcp://") :].rpartition(":")
    if port == "*":
        return
    host = host.strip("[]")
    host = "0.0.0.0" if host == "*" else host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as libzmq: a socket in TIME_WAIT is no clash
            s.bind((host, int(port)))
    except socket.gaierror as exc:
        raise bind_error(endpoint, None, str(exc)) from None
    except OSError as exc:
        raise bind_error(endpoint, exc.errno, exc.strerror or str(exc)) from None


def check_provider(
    *,
    model: str,
    bind: str,
    keys: Path | None,
    name: str,
    allow: list[Path],
    allow_dir: list[Path],
    insecure: bool,
    protocols: tuple[str, ...],
    bottom_layers: int,
    top_layers: int,
    emulator: Path | None,
    record: Path | None,
    trunk_loading: Any,
) -> dict[str, str]:
    """Every check of ``provider serve`` that loads no weights; the plan it would serve, as labelled lines."""
    from guardedp2p.crypto.keys import fingerprint, load_allow_list, load_keypair
    from guardedp2p.designs import get_design
    from guardedp2p.service.client import check_split

    for p in protocols:
        get_design(p)
    if not protocols:
        raise ConfigError("--protocols is empty: name at least one of online, gradfree, offline")
    trunk_loading()  # device / dtype / quantization names
    plan: dict[str, str] = {}
    if insecure:
        plan["identity"] = "INSECURE: plaintext, unauthenticated, anyone may connect"
    else:
        if keys is None:
            raise ConfigError(
                "--keys DIR is required (make keys with `guardedp2p keys generate --out DIR --name provider`), "
                "or pass --insecure for a plaintext debug run"
            )
        public, _ = load_keypair(keys, name)
        allowed = load_allow_list([str(a) for a in allow], [str(d) for d in allow_dir])
        if not allowed:
            raise ConfigError(
                "no client is allowed: the --allow files / --allow-dir folders hold no client public key (NAME.key)"
            )
        plan["identity"] = f"{keys}/{name}.key ({fingerprint(public)})"
        plan["allowed"] = f"{len(allowed)} client key(s)"
    probe_bind(bind)
    plan["listen"] = bind
    depth = check_split(model, bottom_layers, top_layers)
    plan["model"] = model + (f" ({depth} blocks)" if depth else "")
    plan["split"] = f"{bottom_layers} bottom + {top_layers} top blocks on the clients; the trunk here"
    served = list(protocols)
    if "offline" in served:
        if emulator is None:
            served.remove("offline")
            plan["offline"] = "not served: no --emulator folder (build one with `provider emulator build`)"
        elif not emulator.is_dir():
            raise ConfigError(f"--emulator {emulator}: not a folder (build one with `provider emulator build`)")
        else:
            plan["emulator"] = str(emulator)
    plan["designs"] = ", ".join(served)
    if record is not None:
        parent = record if record.exists() else record.parent
        if not parent.is_dir():
            raise ConfigError(f"--record {record}: its parent folder {parent} does not exist")
        plan["recording"] = f"{record} (announced to every client)"
    return plan


def format_plan(plan: dict[str, str]) -> str:
    return "\n".join(f"{k:<11} {v}" for k, v in plan.items())
