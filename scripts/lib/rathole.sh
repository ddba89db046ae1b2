# rathole from crates.io, built once into ~/.cache/postern-bench (outside
# the repository; nothing of it is committed), for the benchmarks that
# measure it beside postern. Source this file, then `ensure_rathole`:
# afterwards "$rathole_bin" is executable, or the build failed and said why.
#
# Its pinned `time` crate no longer compiles on current rustc, hence `cargo
# update -p time`; TLS and WebSocket transports are left out (they need
# OpenSSL headers and are not measured).
rathole_version=0.5.0
cache=${XDG_CACHE_HOME:-$HOME/.cache}/postern-bench
rathole_bin=$cache/rathole-$rathole_version/rathole
build_rathole() {
    local work=$cache/rathole-$rathole_version-build
    rm -rf "$work"
    mkdir -p "$work/fetch/src"
    # A throwaway crate depending on rathole makes cargo download its source.
    printf '[package]\nname = "fetch-rathole"\nversion = "0.0.0"\nedition = "2021"\n\n[dependencies]\nrathole = "=%s"\n' \
        "$rathole_version" > "$work/fetch/Cargo.toml"
    touch "$work/fetch/src/lib.rs"
    (cd "$work/fetch" && cargo fetch -q) || return 1
    local src
    src=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -maxdepth 2 -type d \
        -name "rathole-$rathole_version" | head -n 1)
    [ -n "$src" ] || return 1
    cp -r "$src" "$work/rathole"
    (
        cd "$work/rathole"
        cargo update -q -p time
        CARGO_TARGET_DIR="$work/target" cargo build -q --release --locked \
            --no-default-features --features server,client,noise
    ) || return 1
    mkdir -p "$(dirname "$rathole_bin")"
    cp "$work/target/release/rathole" "$rathole_bin"
    rm -rf "$work"
}
ensure_rathole() {
    [ -x "$rathole_bin" ] && return 0
    echo "== building rathole $rathole_version from crates.io into $cache (once)"
    local log
    log=$(mktemp)
    if ! build_rathole >"$log" 2>&1; then
        echo "rathole build failed; its rows are reported as not run. Last lines:"
        tail -n 15 "$log"
    fi
    rm -f "$log"
}
