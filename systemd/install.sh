#!/usr/bin/env bash
# Install edgehook as a hardened systemd service (Raspberry Pi OS, Debian).
#
#   sudo systemd/install.sh              install, or upgrade in place
#   sudo systemd/install.sh --uninstall  remove service, venv and sysusers file;
#                                        keep /etc/edgehook and /var/lib/edgehook
#   sudo systemd/install.sh --purge      the same, and delete config and state too
#   sudo systemd/install.sh --root DIR   lay everything out under DIR (an image,
#                                        a chroot, a test) and touch nothing else
#
# What it does, in order: creates the `edgehook` system user (sysusers.d); on a
# Raspberry Pi installs lgpio and gpiozero from the distribution (apt's
# python3-lgpio and python3-gpiozero, see install_lgpio below); creates a
# virtualenv in /opt/edgehook/venv (with the system site packages when lgpio
# came from apt) and pip-installs edgehook from the checkout this script sits
# in; links /usr/local/bin/edgehook to it; installs config/starter.yaml as
# /etc/edgehook/edgehook.yaml unless that file exists (it reads the doorbell
# and does nothing else until edited); installs the unit, runs `edgehook
# check`, and only then enables and (re)starts the service. Running it again
# upgrades the code and keeps the config, the credentials and the outbox.
#
# Environment:
#   EDGEHOOK_PIP_ARGS   extra pip arguments, word-split (e.g. "--no-index
#                       --find-links /srv/wheels" for an offline install)
#   EDGEHOOK_PYTHON     interpreter for the venv (default /usr/bin/python3)
#   EDGEHOOK_LGPIO      auto (default: on a Raspberry Pi) | yes | no
#   EDGEHOOK_STARTER_CONFIG  first config to install (default config/starter.yaml)
#   EDGEHOOK_USERADD=1  create the user with useradd even where systemd-sysusers
#                       exists (the fallback path, for tests)
#
# Works in a container or chroot without a Pi or a running systemd: whatever
# it cannot do there is listed as "skipped" at the end.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$SCRIPT_DIR")
readonly SCRIPT_DIR REPO
readonly NAME=edgehook
readonly PREFIX=/opt/edgehook
readonly VENV=$PREFIX/venv
readonly ETC=/etc/edgehook
readonly CONFIG=$ETC/edgehook.yaml
readonly CREDENTIALS=$ETC/credentials
readonly STATE=/var/lib/edgehook
readonly UNIT=/etc/systemd/system/edgehook.service
readonly DROPIN_DIR=/etc/systemd/system/edgehook.service.d
readonly WANTS_LINK=/etc/systemd/system/multi-user.target.wants/edgehook.service
readonly SYSUSERS=/usr/lib/sysusers.d/edgehook.conf
readonly LINK=/usr/local/bin/edgehook

ROOT=""
ACTION=install
PURGE=0
SKIPPED=()
LGPIO=0        # 1: this install needs lgpio (a Pi, or EDGEHOOK_LGPIO=yes)
SYSTEM_SITE=0  # 1: the system Python has lgpio, so the venv sees its site packages

say() { printf 'edgehook-install: %s\n' "$*"; }
skip() { SKIPPED+=("$*"); say "skipped: $*"; }
die() { printf 'edgehook-install: error: %s\n' "$*" >&2; exit 1; }
# A path inside the target root.
r() { printf '%s%s' "$ROOT" "$1"; }

usage() {
    sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

while (($#)); do
    case $1 in
        --root) (($# >= 2)) || die "--root needs a directory"; ROOT=$2; shift 2 ;;
        --root=*) ROOT=${1#--root=}; shift ;;
        --uninstall) ACTION=uninstall; shift ;;
        --purge) ACTION=uninstall; PURGE=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument: $1 (try --help)" ;;
    esac
done

if [[ -n $ROOT ]]; then
    [[ -d $ROOT ]] || die "--root $ROOT: no such directory"
    ROOT=$(cd "$ROOT" && pwd)
    [[ $ROOT != / ]] || ROOT=""
fi
[[ $EUID -eq 0 ]] || die "run as root: sudo $0"

# Scratch space for the build copy and the check; removed on any exit.
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# systemd manages this machine (not a container without init, not a chroot,
# not --root): the same test sd_booted() makes.
systemd_running() {
    [[ -z $ROOT && -d /run/systemd/system ]] && command -v systemctl >/dev/null
}

group_exists() {
    if [[ -n $ROOT ]]; then
        grep -q "^$1:" "$(r /etc/group)" 2>/dev/null
    else
        getent group "$1" >/dev/null
    fi
}

user_exists() {
    if [[ -n $ROOT ]]; then
        grep -q "^$1:" "$(r /etc/passwd)" 2>/dev/null
    else
        getent passwd "$1" >/dev/null
    fi
}

# Numeric gid from the target's group file: under --root, a name would be
# resolved against the host's groups, not the target's.
gid_of() {
    if [[ -n $ROOT ]]; then
        awk -F: -v g="$1" '$1 == g { print $3 }' "$(r /etc/group)"
    else
        getent group "$1" | cut -d: -f3
    fi
}

is_raspberry_pi() {
    grep -qa 'Raspberry Pi' /proc/device-tree/model 2>/dev/null || [[ -e /dev/gpiochip0 ]]
}

# --------------------------------------------------------------------------

create_user() {
    local have_gpio=0
    group_exists gpio && have_gpio=1
    if ((!have_gpio)); then
        skip "gpio group membership: there is no gpio group here (not Raspberry Pi OS?)." \
             "The unit's SupplementaryGroups=gpio fails with status 216/GROUP until one" \
             "exists: create it and give it the gpiochip devices with a udev rule, or drop" \
             "the line with 'systemctl edit edgehook'"
    fi
    if [[ ${EDGEHOOK_USERADD:-0} != 1 ]] && command -v systemd-sysusers >/dev/null; then
        local args=()
        [[ -n $ROOT ]] && args+=(--root "$ROOT")
        if ((have_gpio)); then
            systemd-sysusers "${args[@]}" "$SCRIPT_DIR/edgehook.sysusers"
        else
            systemd-sysusers "${args[@]}" --inline "$(grep '^u ' "$SCRIPT_DIR/edgehook.sysusers")"
        fi
    else
        local args=()
        [[ -n $ROOT ]] && args+=(--root "$ROOT")
        if ! user_exists "$NAME"; then
            useradd "${args[@]}" --system --user-group --no-create-home \
                --home-dir "$STATE" --shell /usr/sbin/nologin \
                --comment "edgehook GPIO/MQTT webhook daemon" "$NAME"
        fi
        if ((have_gpio)); then
            usermod "${args[@]}" --append --groups gpio "$NAME"
        fi
    fi
    user_exists "$NAME" || die "could not create the $NAME user"
    say "system user $NAME ready"
}

pick_python() {
    local py=${EDGEHOOK_PYTHON:-}
    if [[ -z $py ]]; then
        if [[ -x /usr/bin/python3 ]]; then py=/usr/bin/python3; else py=$(command -v python3 || true); fi
    fi
    [[ -n $py ]] || die "python3 not found: sudo apt-get install python3 python3-venv"
    "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$py is older than Python 3.11 (Raspberry Pi OS Bookworm or newer needed)"
    case $(readlink -f "$py") in
        /home/* | /root/*) say "warning: $py lives in a home directory, which the unit hides (ProtectHome=yes)" ;;
    esac
    if ! "$py" -c 'import ensurepip, venv' 2>/dev/null; then
        if [[ -z $ROOT ]] && command -v apt-get >/dev/null; then
            say "installing python3-venv (needed to create the virtualenv)"
            apt-get install -y python3-venv
        else
            die "$py cannot create virtualenvs: install python3-venv"
        fi
    fi
    PYTHON=$py
}

install_venv() {
    local venv pip_args=() src
    venv=$(r "$VENV")
    read -r -a pip_args <<< "${EDGEHOOK_PIP_ARGS:-}"
    mkdir -p "$(r "$PREFIX")"
    local venv_args=() want=false
    if ((SYSTEM_SITE)); then venv_args+=(--system-site-packages); want=true; fi
    # Reuse the venv for an in-place upgrade, unless its interpreter is gone
    # (e.g. after an OS upgrade replaced Python) or it sees the system site
    # packages when it should not, or the other way round: then rebuild it.
    if [[ -x $venv/bin/python ]] && "$venv/bin/python" -c 'import sys' 2>/dev/null \
            && grep -qx "include-system-site-packages = $want" "$venv/pyvenv.cfg" 2>/dev/null; then
        say "upgrading the virtualenv in $venv"
    else
        say "creating a virtualenv in $venv with $PYTHON${venv_args[*]:+ ${venv_args[*]}}"
        "$PYTHON" -m venv --clear "${venv_args[@]}" "$venv"
    fi
    # Build from a copy: pip builds in the source tree, and root-owned
    # build/ and *.egg-info directories in the user's checkout would get in
    # the way of the next `git pull`.
    src=$WORK/src
    rm -rf "$src" && mkdir -p "$src"
    local parts=(pyproject.toml daemon) extra
    for extra in "$REPO"/README* "$REPO"/LICENSE*; do
        [[ -e $extra ]] && parts+=("$(basename "$extra")")
    done
    tar -C "$REPO" --exclude=__pycache__ --exclude='*.egg-info' -cf - "${parts[@]}" \
        | tar -C "$src" -xf -
    say "installing edgehook from $REPO"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        --upgrade "${pip_args[@]}" "$src"
    # Same version number, new code (a git pull between runs): make sure the
    # package itself is replaced, without touching its dependencies.
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        --force-reinstall --no-deps "${pip_args[@]}" "$src"
    [[ -x $venv/bin/edgehook ]] || die "pip did not install $venv/bin/edgehook"
    if ((LGPIO)); then venv_lgpio "$venv"; fi
}

# Whether this install needs lgpio: on a Raspberry Pi (or EDGEHOOK_LGPIO=yes).
want_lgpio() {
    case ${EDGEHOOK_LGPIO:-auto} in
        yes) LGPIO=1 ;;
        no) skip "lgpio: EDGEHOOK_LGPIO=no" ;;
        auto)
            if [[ -n $ROOT ]]; then
                skip "lgpio: --root install (EDGEHOOK_LGPIO=yes adds it, e.g. for a Pi image)"
            elif is_raspberry_pi; then
                LGPIO=1
            else
                skip "lgpio: not a Raspberry Pi (no 'Raspberry Pi' in /proc/device-tree/model, no /dev/gpiochip0)"
            fi
            ;;
        *) die "EDGEHOOK_LGPIO must be auto, yes or no" ;;
    esac
}

# gpiozero picks lgpio first; it talks to /dev/gpiochip* and works on a Pi 5,
# where RPi.GPIO does not. PyPI has lgpio wheels only for CPython 3.11 (aarch64
# and armv7l); for any other Python (Trixie's 3.13) pip would build it from
# source, which needs a compiler, swig and the lgpio C library. Raspberry Pi OS
# packages it for its own Python as python3-lgpio (Bookworm and Trixie, 32- and
# 64-bit), so that is what we install, with the python3-gpiozero built for it,
# and the venv is created with --system-site-packages so that it imports them.
# Packages pip installs into the venv still come first.
install_lgpio() {
    if [[ -z $ROOT ]] && command -v apt-get >/dev/null; then
        say "installing python3-lgpio and python3-gpiozero with apt"
        if ! apt-get install -y --no-install-recommends python3-lgpio python3-gpiozero; then
            say "warning: apt could not install python3-lgpio (it comes from the Raspberry"
            say "  Pi OS archive; plain Debian does not have it): trying pip next"
        fi
    fi
    if "$PYTHON" -c 'import lgpio' 2>/dev/null; then
        SYSTEM_SITE=1
        say "$PYTHON imports lgpio: the virtualenv will use the system's lgpio"
    fi
}

# After pip: lgpio from the system packages, else a PyPI wheel into the venv.
venv_lgpio() {
    local venv=$1 pip_args=()
    if "$venv/bin/python" -c 'import lgpio' 2>/dev/null; then
        say "lgpio: $("$venv/bin/python" -c 'import lgpio; print(lgpio.__file__)')"
        return
    fi
    read -r -a pip_args <<< "${EDGEHOOK_PIP_ARGS:-}"
    say "installing lgpio into the venv with pip"
    if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
            --only-binary lgpio "${pip_args[@]}" lgpio; then
        say "warning: no lgpio for this Python: apt has no python3-lgpio here and PyPI"
        say "  has no wheel for this Python and CPU. Until lgpio is there, edgehook"
        say "  reports that no GPIO was found. On Raspberry Pi OS:"
        say "  sudo apt-get install python3-lgpio && sudo $0"
        SKIPPED+=("lgpio: neither apt nor pip had it (see the warning above)")
    fi
}

# `edgehook` on PATH for admins (sudo's secure_path includes /usr/local/bin).
# An existing file that is not our link is left alone.
install_link() {
    local link
    link=$(r "$LINK")
    if [[ -e $link && ! -L $link ]]; then
        skip "$LINK exists and is not a link: left alone (the CLI is $VENV/bin/edgehook)"
        return
    fi
    mkdir -p "$(dirname "$link")"
    ln -sfn "$VENV/bin/edgehook" "$link"
    say "linked $LINK -> $VENV/bin/edgehook"
}

install_config() {
    local gid starter=${EDGEHOOK_STARTER_CONFIG:-$REPO/config/starter.yaml}
    gid=$(gid_of "$NAME")
    [[ -n $gid ]] || die "no $NAME group"
    install -d -m 0755 -o 0 -g 0 "$(r "$ETC")"
    # Secrets for LoadCredential=edgehook:/etc/edgehook/credentials: only root
    # reads them here; systemd hands the service private copies.
    install -d -m 0700 -o 0 -g 0 "$(r "$CREDENTIALS")"
    if [[ -e $(r "$CONFIG") ]]; then
        say "keeping the existing $CONFIG"
    else
        [[ -f $starter ]] || die "no starting config: $starter is missing"
        install -m 0640 -o 0 -g "$gid" "$starter" "$(r "$CONFIG")"
        say "installed $CONFIG from $starter: it only reads the doorbell until you"
        say "  edit it (the steps are in the file), then 'sudo systemctl restart edgehook'"
    fi
}

install_unit_files() {
    install -D -m 0644 "$SCRIPT_DIR/edgehook.service" "$(r "$UNIT")"
    install -D -m 0644 "$SCRIPT_DIR/edgehook.sysusers" "$(r "$SYSUSERS")"
    say "installed $UNIT and $SYSUSERS"
}

# Validate the config the way the service will see it. The service reads
# secrets from $CREDENTIALS_DIRECTORY/edgehook_<file> (LoadCredential= with a
# directory); outside the unit we point that variable at links with the same
# names. Prints why and returns 1 when the config is wrong.
check_config() {
    local edgehook creds f rc=0
    edgehook=$(r "$VENV")/bin/edgehook
    creds=$WORK/credentials
    rm -rf "$creds" && mkdir -m 0700 "$creds"
    for f in "$(r "$CREDENTIALS")"/*; do
        if [[ -f $f ]]; then ln -s "$f" "$creds/edgehook_$(basename "$f")"; fi
    done
    say "checking $CONFIG"
    CREDENTIALS_DIRECTORY=$creds EDGEHOOK_CONFIG=$(r "$CONFIG") \
        "$edgehook" check -c "$(r "$CONFIG")" || rc=$?
    return "$rc"
}

enable_and_start() {
    local checked=$1
    if ((!checked)) && [[ -z $ROOT ]]; then
        if systemd_running; then systemctl daemon-reload; fi
        die "not enabling or starting edgehook: 'edgehook check' found problems in $CONFIG
(printed above). Everything else is installed: fix the config, then run this script again."
    fi
    if systemd_running; then
        systemctl daemon-reload
        systemctl enable edgehook.service
        # restart, not start: after an upgrade the running daemon has old code.
        systemctl restart edgehook.service
        if systemctl is-active --quiet edgehook.service; then
            say "edgehook is running: systemctl status edgehook; journalctl -u edgehook -f"
        else
            die "edgehook did not start: journalctl -u edgehook -e"
        fi
        return
    fi
    if [[ -n $ROOT ]]; then
        skip "daemon-reload and start: --root install"
    else
        skip "daemon-reload and start: systemd is not running here (container or chroot)"
    fi
    if ((!checked)); then
        skip "enabling the unit: the config did not pass 'edgehook check'"
    elif command -v systemctl >/dev/null; then
        # Offline enable only creates the [Install] symlink; it starts at boot.
        systemctl --root="${ROOT:-/}" --quiet enable edgehook.service
        say "enabled edgehook.service offline: it starts at the next boot"
    else
        skip "enabling the unit: systemctl is not installed"
    fi
}

do_install() {
    pick_python
    create_user
    want_lgpio
    if ((LGPIO)); then install_lgpio; fi
    install_venv
    install_link
    install_config
    install_unit_files
    local checked=1
    if ! check_config; then
        checked=0
        if [[ -n $ROOT ]]; then
            say "warning: 'edgehook check' failed for $(r "$CONFIG") (see above)"
        fi
    fi
    enable_and_start "$checked"
    say "installed $("$(r "$VENV")/bin/edgehook" --version 2>/dev/null || echo edgehook)"
    say "the CLI reads $CONFIG (root:$NAME 0640) and the outbox (only $NAME): run it"
    say "  with sudo, e.g. 'sudo edgehook outbox list'"
}

do_uninstall() {
    if systemd_running; then
        systemctl disable --now edgehook.service 2>/dev/null || true
    elif command -v systemctl >/dev/null && [[ -e $(r "$UNIT") ]]; then
        systemctl --root="${ROOT:-/}" --quiet disable edgehook.service 2>/dev/null || true
    fi
    rm -f "$(r "$WANTS_LINK")" "$(r "$UNIT")" "$(r "$SYSUSERS")"
    if [[ $(readlink "$(r "$LINK")" 2>/dev/null) == "$VENV/bin/edgehook" ]]; then
        rm -f "$(r "$LINK")"
    fi
    rm -rf "$(r "$VENV")"
    rmdir "$(r "$PREFIX")" 2>/dev/null || true
    say "removed the unit, $VENV, $LINK and $SYSUSERS"
    if ((PURGE)); then
        rm -rf "$(r "$ETC")" "$(r "$STATE")" "$(r "$DROPIN_DIR")"
        say "purged $ETC (config and credentials), $STATE (outbox) and $DROPIN_DIR"
    else
        say "kept $ETC and $STATE (use --purge to delete them)"
    fi
    if systemd_running; then
        systemctl daemon-reload
        systemctl reset-failed edgehook.service 2>/dev/null || true
    fi
    say "kept the $NAME system user (remove it with: userdel $NAME)"
}

if [[ $ACTION == install ]]; then do_install; else do_uninstall; fi

if ((${#SKIPPED[@]})); then
    say "done; skipped:"
    for item in "${SKIPPED[@]}"; do say "  - $item"; done
else
    say "done"
fi
