# Sourced by scripts/run and scripts/test: make .venv and install llmsvc into it.
# Usage: setup_venv EXTRAS   (EXTRAS: "" for the daemon alone, "[test]" for the test suite)
# Installs only when pyproject.toml or EXTRAS changed since the last install (a content hash:
# git checkouts do not preserve mtimes).

venv=.venv
is_root() { [ "$(id -u)" -eq 0 ]; }

setup_venv() {
    local extras=$1 stamp=$venv/.llmsvc-install-stamp want
    if [ ! -x "$venv/bin/python" ]; then
        echo "llmsvc: creating $venv" >&2
        if ! python3 -m venv "$venv"; then
            rm -rf "$venv"
            if is_root && command -v apt-get >/dev/null; then
                echo "llmsvc: python3 -m venv failed; installing python3-venv" >&2
                DEBIAN_FRONTEND=noninteractive apt-get update -q
                DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
                python3 -m venv "$venv"
            else
                echo "llmsvc: 'python3 -m venv' failed; install Python 3.11+ with venv" \
                    "support (Debian/Ubuntu: apt-get install python3-venv) and rerun." >&2
                exit 2
            fi
        fi
    fi
    want="$(sha256sum pyproject.toml | cut -d' ' -f1) $extras"
    # A test install also serves the daemon; only a missing or different install reinstalls.
    case "$(cat "$stamp" 2>/dev/null || true)" in
        "$want" | "${want%% *} [test]") return 0 ;;
    esac
    echo "llmsvc: installing -e '.$extras' into $venv" >&2
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".$extras"
    echo "$want" >"$stamp"
}
