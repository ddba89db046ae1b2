# shellcheck shell=bash disable=SC2034  # the board_* and tc_* variables are for the scripts that source this
# Board profiles (boards/NAME.toml) and the toolchain each target needs.
# Sourced by build-board, board-run, install-image and bench-sizes, so the
# profile is read one way and a target maps to one linker and one emulator.
#
# Board files are TOML kept to a subset this file can read without a TOML
# library on the build host: `key = "string"`, `key = true|false` and
# `key = ["string", ...]` on one line, `#` comments. Anything else is
# refused with the file and line, never guessed at.

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=packages.sh
source "$repo_root/scripts/lib/packages.sh"

die() {
    echo "${0##*/}: $*" >&2
    exit 1
}

# The subset parser. Prints one record per line, tab-separated:
#   s KEY VALUE   a string        b KEY true|false   a boolean
#   a KEY         an array starts e KEY VALUE        one array element
# so that the shell side assigns values and never evaluates them.
read -r -d '' board_awk <<'AWK' || true
function fail(msg) { printf "%s:%d: %s\n", FILENAME, FNR, msg > "/dev/stderr"; failed = 1; exit 1 }
# Consumes a "..." string at the start of rest; sets str.
function take_string() {
    if (rest == "") fail("the line ends inside the value (arrays stay on one line)")
    if (!match(rest, /^"[^"\\\t]*"/)) fail("expected a \"string\" without escapes or tabs")
    str = substr(rest, 2, RLENGTH - 2)
    rest = substr(rest, RLENGTH + 1)
}
function skip_space() { sub(/^[ \t]+/, "", rest) }
function end_of_line() {
    skip_space()
    if (rest != "" && rest !~ /^#/) fail("unexpected text after the value: " rest)
}
{
    rest = $0
    skip_space()
    if (rest == "" || rest ~ /^#/) next
    if (!match(rest, /^[a-z_]+[ \t]*=[ \t]*/)) fail("expected key = value")
    key = rest
    sub(/[ \t]*=.*/, "", key)
    rest = substr(rest, RLENGTH + 1)
    if (key in seen) fail(key " is given twice")
    seen[key] = 1
    if (rest ~ /^"/) {
        take_string()
        print "s\t" key "\t" str
    } else if (match(rest, /^(true|false)/)) {
        print "b\t" key "\t" substr(rest, 1, RLENGTH)
        rest = substr(rest, RLENGTH + 1)
    } else if (rest ~ /^\[/) {
        print "a\t" key
        rest = substr(rest, 2)
        skip_space()
        while (rest !~ /^\]/) {
            take_string()
            print "e\t" key "\t" str
            skip_space()
            if (rest ~ /^,/) { rest = substr(rest, 2); skip_space() }
            else if (rest !~ /^\]/) fail("expected , or ] in the array (arrays stay on one line)")
        }
        rest = substr(rest, 2)
    } else {
        fail("expected a \"string\", true, false or [\"array\"]")
    }
    end_of_line()
}
AWK

# The board names there are profiles for, one per line.
board_names() {
    local file
    for file in "$repo_root"/boards/*.toml; do
        [[ -e $file ]] || continue
        file=${file##*/}
        echo "${file%.toml}"
    done
}

# board_load NAME: reads boards/NAME.toml into board_* variables and checks
# it; dies naming the file and field on any mistake.
board_load() {
    local name=$1 kind key value parsed
    [[ $name =~ ^[a-z0-9][a-z0-9-]*$ ]] || die "board name ${name@Q}: use lower-case letters, digits and -"
    board_name=$name
    board_file=$repo_root/boards/$name.toml
    [[ -f $board_file ]] || die "no board profile boards/$name.toml; known boards: $(board_names | tr '\n' ' ')"
    parsed=$(awk "$board_awk" "$board_file") || die "boards/$name.toml is not in the supported TOML subset (see boards/README.md)"

    board_description="" board_target="" board_static="" board_bin_path="" board_config_path="" board_std=prebuilt
    board_features=() board_rustflags=() board_serial=()
    local -A given=()
    while IFS=$'\t' read -r kind key value; do
        [[ -n $kind ]] || continue
        given[$key]=1
        case $kind:$key in
            s:description) board_description=$value ;;
            s:target) board_target=$value ;;
            s:bin_path) board_bin_path=$value ;;
            s:config_path) board_config_path=$value ;;
            s:std) board_std=$value ;;
            b:static) board_static=$value ;;
            a:features | a:rustflags | a:serial) ;;
            e:features) board_features+=("$value") ;;
            e:rustflags) board_rustflags+=("$value") ;;
            e:serial) board_serial+=("$value") ;;
            *) die "boards/$name.toml: $key: unknown key, or not of its type (see boards/README.md)" ;;
        esac
    done <<<"$parsed"

    local required
    for required in target features static bin_path config_path; do
        [[ -n ${given[$required]:-} ]] || die "boards/$name.toml: $required: missing (see boards/README.md)"
    done
    [[ $board_target =~ ^[a-z0-9_.]+(-[a-z0-9_.]+){2,3}$ ]] || die "boards/$name.toml: target ${board_target@Q} is not a target triple"
    local feature has_agent=""
    for feature in "${board_features[@]}"; do
        [[ $feature =~ ^[a-z0-9_-]+$ ]] || die "boards/$name.toml: features: ${feature@Q} is not a cargo feature name"
        if [[ $feature == station ]]; then
            die "boards/$name.toml: features: a board runs the agent; the station belongs at the central site"
        fi
        if [[ $feature == agent ]]; then has_agent=1; fi
    done
    [[ -n $has_agent ]] || die "boards/$name.toml: features: must include \"agent\""
    local flag
    for flag in "${board_rustflags[@]}"; do
        [[ $flag =~ ^[^[:space:]]+$ ]] || die "boards/$name.toml: rustflags: ${flag@Q}: one argument per element, no spaces"
    done
    # The C library decides static or not; the profile states it so that a
    # reader sees it, and build-board checks the binary against it.
    if [[ $board_target == *-musl* ]]; then
        [[ $board_static == true ]] || die "boards/$name.toml: static: musl targets link statically; set static = true"
    else
        [[ $board_static == false ]] || die "boards/$name.toml: static: glibc cannot be linked statically and still resolve host names (NSS); use a musl target"
    fi
    local device
    for device in "${board_serial[@]}"; do
        [[ $device =~ ^/dev/[A-Za-z0-9._/-]+$ && $device != *..* ]] || die "boards/$name.toml: serial: ${device@Q} is not a path under /dev"
    done
    for key in bin_path config_path; do
        value=board_$key
        [[ ${!value} =~ ^/[A-Za-z0-9._/-]+$ && ${!value} != *..* && ${!value} != */ ]] || die "boards/$name.toml: $key: ${!value@Q} must be an absolute file path"
    done
    [[ $board_config_path == *.toml ]] || die "boards/$name.toml: config_path: must end in .toml"
    [[ $board_std == prebuilt || $board_std == rebuilt ]] || die "boards/$name.toml: std: ${board_std@Q} is neither \"prebuilt\" nor \"rebuilt\""

    board_dist=$repo_root/dist/$name
    board_binary=$board_dist/postern
}

# toolchain_for TARGET: what building and running for TARGET takes.
#   tc_linker          the linker cargo is told to use
#   tc_linker_packages the Debian packages with it and the target's libc to
#                      link against (none when rustup ships all of it)
#   tc_cc              the C compiler for crates that build C (ring, via the
#                      cc crate), and tc_cc_packages, with it and its headers
#   tc_qemu            the qemu-user emulator for the architecture
#   tc_sysroot         where qemu finds the dynamic loader and libc ("" if static)
#   tc_machine         the ELF machine readelf reports
#   tc_arch            what `uname -m` says on such a machine
toolchain_for() {
    case $1 in
        armv7-unknown-linux-gnueabihf | thumbv7neon-unknown-linux-gnueabihf)
            debian_cross arm-linux-gnueabihf armhf
            tc_qemu=qemu-arm-static tc_machine=ARM tc_arch=armv7l ;;
        aarch64-unknown-linux-gnu)
            debian_cross aarch64-linux-gnu arm64
            tc_qemu=qemu-aarch64-static tc_machine=AArch64 tc_arch=aarch64 ;;
        aarch64-unknown-linux-musl)
            # rustup ships rust-lld and the musl target ships its own crt
            # objects and libc.a, so linking needs nothing else. C code
            # such as ring's uses no libc headers that differ from glibc's,
            # so Debian's glibc cross gcc compiles it for musl too.
            tc_linker=rust-lld tc_linker_packages=()
            tc_cc=aarch64-linux-gnu-gcc tc_cc_packages=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
            tc_qemu=qemu-aarch64-static tc_sysroot=""
            tc_machine=AArch64 tc_arch=aarch64 ;;
        # Not boards: the native agents whose memory bench-sizes measures,
        # linked the ways the boards are.
        x86_64-unknown-linux-musl)
            tc_linker=rust-lld tc_linker_packages=()
            tc_cc=cc tc_cc_packages=()
            tc_qemu="" tc_sysroot=""
            tc_machine=X86-64 tc_arch=x86_64 ;;
        x86_64-unknown-linux-gnu)
            tc_linker=cc tc_linker_packages=()
            tc_cc=cc tc_cc_packages=()
            tc_qemu="" tc_sysroot=""
            tc_machine=X86-64 tc_arch=x86_64 ;;
        *) die "no toolchain known for $1; add it to toolchain_for in scripts/lib/board.sh" ;;
    esac
}

# debian_cross GNU_TRIPLE DEBIAN_ARCH: Debian's cross gcc links and compiles
# for a glibc target, against the target libc in /usr/GNU_TRIPLE.
debian_cross() {
    tc_linker=$1-gcc tc_cc=$1-gcc tc_sysroot=/usr/$1
    tc_linker_packages=("gcc-$1" "libc6-dev-$2-cross")
    tc_cc_packages=("${tc_linker_packages[@]}")
}

# The environment variable name cargo reads per target, e.g.
# cargo_target_var thumbv7neon-unknown-linux-gnueabihf LINKER.
cargo_target_var() {
    local triple=${1^^}
    echo "CARGO_TARGET_${triple//[-.]/_}_$2"
}

# std_rebuild_args: sets std_args to the cargo arguments that compile the
# standard library together with the agent, adding rustup's rust-src
# component (std's source) when it is missing.
#
# Why: rustup's prebuilt std is compiled with its `backtrace` feature, so
# every binary that can panic links a backtrace symbolizer (gimli,
# addr2line, miniz_oxide, rustc_demangle; about 120 KiB on armv7) which
# has nothing to read in a stripped binary. Rebuilt without that feature,
# std keeps its panic messages (what panicked, where) and drops the
# symbolizer, and the device profile's opt-level and LTO reach into std.
# -Z build-std is a cargo option that stable cargo accepts only with
# RUSTC_BOOTSTRAP=1, which build_agent sets for this one build; the
# compiler is the same stable release either way. With it rustc reports
# unstable cfgs (target_has_reliable_f128, ...) that std's
# compiler_builtins needs to see to provide the f128 routines musl's printf
# links against; cargo caches those reports per target directory without
# regard to RUSTC_BOOTSTRAP, so build_agent also turns that cache off
# (CARGO_CACHE_RUSTC_INFO=0) lest a stable-std build's answers be reused.
#
# Also sets std_flags, rustflags for such a build: -Cforce-unwind-tables=no.
# With panic = "abort" nothing unwinds, and without the symbolizer nothing
# walks the stack for a backtrace either, so the unwind tables would serve
# no one: 16 KiB of the armv7 agent, 24 KiB with TLS (.ARM.exidx and
# .ARM.extab), 131 KiB of the aarch64 and x86-64 ones (.eh_frame). A
# panic still prints its message and location, then aborts.
# With rustup's std the tables stay, for RUST_BACKTRACE=1's backtraces.
std_rebuild_args() {
    local sysroot
    sysroot=$(rustc --print sysroot)
    if [[ ! -f $sysroot/lib/rustlib/src/rust/library/Cargo.lock ]]; then
        echo "== rustup component add rust-src" >&2
        rustup component add rust-src >&2 ||
            die "std = \"rebuilt\" needs std's source (rustup component add rust-src); without it, build with std = \"prebuilt\" in the board profile"
    fi
    # No `backtrace`, and no `panic-unwind`, which the device profile's
    # panic = "abort" does not use. `optimize_for_size` makes std take its
    # smaller code where it has two ways (sorting, integer formatting,
    # float parsing without the fast path, slice rotation, byte escapes):
    # 0.7 KiB of the armv7 agent, 3.6 KiB with TLS. What the agent sorts
    # (rustls, a dozen ClientHello extensions) and formats (log lines,
    # headers) is small and rare; the bytes it carries go through none of it.
    std_args=(-Z "build-std=std,panic_abort" -Z build-std-features=optimize_for_size)
    std_flags=(-Cforce-unwind-tables=no)
}

# build_agent TARGET FEATURES STD [RUSTFLAG...]: builds the agent for
# TARGET with the size-tuned `device` cargo profile, first adding the rust
# target and the linker when they are missing; sets built_binary to the
# result. FEATURES "default" builds postern's default features, station
# included (scripts/package's ARM `postern` packages). STD is "prebuilt"
# (rustup's standard library for the target) or "rebuilt" (compiled with
# the agent, see std_rebuild_args).
# CARGO_PROFILE_DEVICE_* and CARGO_TARGET_DIR from the environment apply.
build_agent() {
    local target=$1 features=$2 std=$3
    shift 3
    toolchain_for "$target"
    if ! rustup target list --installed | grep -qx "$target"; then
        echo "== rustup target add $target" >&2
        rustup target add "$target" >&2
    fi
    local -a std_env=() std_args=() std_flags=()
    if [[ $std == rebuilt ]]; then
        std_rebuild_args
        std_env=(RUSTC_BOOTSTRAP=1 CARGO_CACHE_RUSTC_INFO=0)
    elif [[ $std != prebuilt ]]; then
        die "build_agent: std must be prebuilt or rebuilt, not ${std@Q}"
    fi
    apt_install "${tc_linker_packages[@]}"
    # The cc crate in the lock file means some dependency compiles C (today
    # none does; snow's `std` feature would bring ring's C and assembly).
    local -a c_env=()
    if grep -qx 'name = "cc"' "$repo_root/Cargo.lock"; then
        apt_install "${tc_cc_packages[@]}"
        c_env=("CC_${target//-/_}=$tc_cc")
    fi
    if [[ -n ${RUSTFLAGS:-}${CARGO_ENCODED_RUSTFLAGS:-} ]]; then
        echo "${0##*/}: ignoring RUSTFLAGS/CARGO_ENCODED_RUSTFLAGS; board flags go in boards/*.toml" >&2
    fi
    local -a flags=("${std_flags[@]}" "$@")
    local shown=${flags[*]}
    # Panic messages carry the source path of the code that panics, and for
    # dependencies and inlined std code that is a path on this machine
    # (/home/NAME/.cargo/registry/src/..., and with the rust-src component
    # installed, the toolchain's). Mapped to fixed names, the binary is the
    # same on every build machine and smaller: 4 KiB on armv7 with rust-src.
    local sysroot index
    sysroot=$(rustc --print sysroot)
    flags+=("--remap-path-prefix=$sysroot/lib/rustlib/src/rust=/rustc/$(rustc -vV | sed -n 's/^commit-hash: //p')")
    for index in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/; do
        if [[ -d $index ]]; then flags+=("--remap-path-prefix=${index%/}=/crates"); fi
    done
    echo "== ${std_env[*]:+${std_env[*]} }cargo build ${std_args[*]:+${std_args[*]} }--profile device --target $target --no-default-features --features $features${shown:+ (rustflags: $shown)}" >&2
    (
        cd "$repo_root" || exit
        # The encoded form keeps paths with spaces whole. With --target it
        # applies to the agent only, not to build scripts and proc macros.
        env -u RUSTFLAGS "$(cargo_target_var "$target" LINKER)=$tc_linker" "${c_env[@]}" "${std_env[@]}" \
            CARGO_ENCODED_RUSTFLAGS="$(IFS=$'\x1f'; echo "${flags[*]}")" \
            cargo build --locked "${std_args[@]}" --profile device --target "$target" \
            --no-default-features --features "$features" >&2
    ) || {
        # -Z build-std is unstable: a new toolchain may change or break it.
        [[ $std == prebuilt ]] ||
            echo "${0##*/}: the build with std rebuilt failed; std = \"prebuilt\" in the board profile builds with rustup's std (a larger binary, boards/README.md)" >&2
        die "cargo build for $target failed"
    }
    built_binary=${CARGO_TARGET_DIR:-$repo_root/target}/$target/device/postern
}

# linkage_of BINARY: "static", or "glibc 2.NN+" naming the newest glibc
# symbol version the binary needs (the board's glibc must be that new).
linkage_of() {
    if readelf -l "$1" | grep -q 'Requesting program interpreter'; then
        local newest
        newest=$(readelf -V "$1" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n 1)
        echo "glibc ${newest#GLIBC_}+"
    else
        echo static
    fi
}

# board_runner: sets the array board_run to the command prefix that runs
# the board's binary here: nothing when this machine has the board's
# architecture, else its qemu-user emulator (installed when missing).
board_runner() {
    toolchain_for "$board_target"
    if [[ $(uname -m) == "$tc_arch" ]]; then
        board_run=()
        return
    fi
    command -v "$tc_qemu" >/dev/null || apt_install qemu-user-static
    board_run=("$tc_qemu")
    [[ -z $tc_sysroot ]] || board_run+=(-L "$tc_sysroot")
}
