#!/bin/sh
# Installs moerged's service files. Run from a checkout after `cargo build --release -p moerge-daemon`.
#
#   dist/install.sh --user     session bus: systemd user unit + D-Bus activation (no root)
#   dist/install.sh --system   system bus: policy file + systemd system unit (as root)
#
# Then put MOERGE_LIBRARY=/path/to/experts and MOERGE_BASE=/path/to/base in the env file it
# names, and: systemctl [--user] enable --now moerged
set -eu
here=$(cd "$(dirname "$0")" && pwd)
bin=${MOERGED:-$here/../target/release/moerged}
[ -x "$bin" ] || { echo "install.sh: no moerged at $bin (build it, or set MOERGED)" >&2; exit 1; }

case "${1:-}" in
--user)
    data=${XDG_DATA_HOME:-$HOME/.local/share}
    config=${XDG_CONFIG_HOME:-$HOME/.config}
    install -Dm755 "$bin" "$HOME/.local/bin/moerged"
    install -Dm644 "$here/moerged-user.service" "$config/systemd/user/moerged.service"
    install -Dm644 "$here/org.moerge.Daemon1.service" "$data/dbus-1/services/org.moerge.Daemon1.service"
    [ -e "$config/moerge/moerged.env" ] || install -Dm644 /dev/null "$config/moerge/moerged.env"
    systemctl --user daemon-reload 2>/dev/null || true
    echo "installed; set MOERGE_LIBRARY and MOERGE_BASE in $config/moerge/moerged.env"
    ;;
--system)
    [ "$(id -u)" = 0 ] || { echo "install.sh --system: run as root" >&2; exit 1; }
    id moerge >/dev/null 2>&1 || useradd --system --home-dir /var/lib/moerge --shell /usr/sbin/nologin moerge
    install -Dm755 "$bin" /usr/local/bin/moerged
    install -Dm644 "$here/org.moerge.Daemon1.conf" /usr/share/dbus-1/system.d/org.moerge.Daemon1.conf
    install -Dm644 "$here/moerged.service" /etc/systemd/system/moerged.service
    [ -e /etc/moerge/moerged.env ] || install -Dm644 /dev/null /etc/moerge/moerged.env
    systemctl daemon-reload 2>/dev/null || true
    systemctl reload dbus 2>/dev/null || true
    echo "installed; set MOERGE_LIBRARY and MOERGE_BASE in /etc/moerge/moerged.env"
    ;;
*)
    echo "usage: dist/install.sh --user | --system" >&2
    exit 2
    ;;
esac
