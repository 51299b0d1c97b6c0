#!/usr/bin/python3
"""A small moerge client in Python, on the system's `dbus` module (python3-dbus).

Lists the experts, fuses a uniform merge of some of them, scores a completion, generates,
and releases the model. Talks to the session bus unless --system is given (set
DBUS_SESSION_BUS_ADDRESS to reach a private bus).

    /usr/bin/python3 moerge_client.py --experts upper,rot13 --prompt 'upper kiwi>' --completion $'KIWI\\n'
"""

import argparse
import json
import sys

import dbus

NAME = "org.moerge.Daemon1"
DAEMON_PATH = "/org/moerge/Daemon1"
DAEMON_IFACE = "org.moerge.Daemon1"
MODEL_IFACE = "org.moerge.Model1"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", action="store_true", help="use the system bus")
    parser.add_argument("--experts", help="comma-separated experts to merge (default: all ready)")
    parser.add_argument("--prompt", default="upper kiwi>")
    parser.add_argument("--completion", default="KIWI\n")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    bus = dbus.SystemBus() if args.system else dbus.SessionBus()
    daemon = dbus.Interface(bus.get_object(NAME, DAEMON_PATH), DAEMON_IFACE)

    # ListExperts returns a(ssssttt): name, hash, state, reason, generation, size, library generation.
    experts = {str(e[0]): (str(e[1]), str(e[2])) for e in daemon.ListExperts()}
    for name, (digest, state) in sorted(experts.items()):
        print(f"{name:20} {state:12} {digest[:12]}")

    wanted = args.experts.split(",") if args.experts else [n for n, (_, s) in experts.items() if s == "ready"]
    missing = [n for n in wanted if n not in experts]
    if missing:
        sys.exit(f"no such experts: {', '.join(missing)}")
    plan = {
        "moerge_plan": 1,
        "experts": [{"name": n, "hash": experts[n][0]} for n in wanted],
        "default": {"static": {"weights": [1.0 / len(wanted)] * len(wanted), "space": "lowrank"}},
    }
    try:
        path = daemon.FusePlan(json.dumps(plan))
    except dbus.DBusException as e:
        # Errors are named: org.moerge.Error.InvalidArgument, NoSuchExpert, LimitExceeded...
        sys.exit(f"{e.get_dbus_name()}: {e.get_dbus_message()}")
    print(f"model: {path}")

    model = dbus.Interface(bus.get_object(NAME, path), MODEL_IFACE)
    try:
        # Score returns (asauaddd): tokens, ids, per-token NLL, total, mean.
        tokens, _ids, nll, total, mean = model.Score(args.prompt, args.completion)
        per_token = " ".join(f"{str(t)!r}:{float(x):.3f}" for t, x in zip(tokens, nll))
        print(f"mean NLL {float(mean):.4f} (total {float(total):.4f}): {per_token}")

        options = dbus.Dictionary({"max_tokens": dbus.UInt32(args.max_tokens)}, signature="sv")
        text = model.Generate(args.prompt, options)
        print(f"generated: {str(text)!r}")
    finally:
        model.Release()
        print("released")


if __name__ == "__main__":
    main()
