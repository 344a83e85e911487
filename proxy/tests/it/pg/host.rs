//! The host side of the PostgreSQL harness: where the server binaries are, which OS user runs
//! them, the directories they live in (and the clean-up of those left by killed test
//! processes), and free ports.

use std::collections::HashSet;
use std::ffi::CString;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use super::*;

// ---------------------------------------------------------------------------
// Binaries.

/// Path of a PostgreSQL binary in the server bin directory.
pub fn bin(name: &str) -> PathBuf {
    bindir().join(name)
}

/// Directory holding `initdb`, `postgres`, `pg_ctl`, `psql`, `pgbench`, ...
pub fn bindir() -> &'static Path {
    static BINDIR: OnceLock<PathBuf> = OnceLock::new();
    BINDIR.get_or_init(find_bindir)
}

pub(super) fn find_bindir() -> PathBuf {
    let has_server = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Some(dir) = std::env::var_os("PGTEST_BINDIR") {
        let dir = PathBuf::from(dir);
        assert!(
            has_server(&dir),
            "PGTEST_BINDIR={} has no initdb/postgres",
            dir.display()
        );
        return dir;
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if has_server(&dir) {
                return dir;
            }
        }
    }
    // Debian/Ubuntu: /usr/lib/postgresql/<major>/bin; take the newest.
    let mut best: Option<(u32, PathBuf)> = None;
    if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
        for e in entries.flatten() {
            let Some(ver) = e
                .file_name()
                .to_str()
                .and_then(|s| s.split('.').next()?.parse::<u32>().ok())
            else {
                continue;
            };
            let dir = e.path().join("bin");
            if has_server(&dir) && best.as_ref().is_none_or(|(v, _)| ver > *v) {
                best = Some((ver, dir));
            }
        }
    }
    match best {
        Some((_, dir)) => dir,
        None => panic!(
            "PostgreSQL server binaries (initdb, postgres) not found: neither `pg_config --bindir` \
             nor /usr/lib/postgresql/*/bin has them. Install the server, e.g. \
             `apt-get install -y postgresql` on Debian/Ubuntu (CI's .ci/run does this), \
             or set PGTEST_BINDIR to the directory holding initdb."
        ),
    }
}

// ---------------------------------------------------------------------------
// Running as an unprivileged user when we are root.

/// (uid, gid) of the OS user the server runs as, or None when it runs as we do (we are not
/// root). Files the server must own (its TLS key) go to this user.
pub fn pg_os_user() -> Option<(u32, u32)> {
    pg_user()
}

/// (uid, gid) to run server binaries as, or None when we are not root.
pub(super) fn pg_user() -> Option<(u32, u32)> {
    static USER: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    *USER.get_or_init(|| {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        if let Some(ids) = lookup_user("postgres") {
            return Some(ids);
        }
        if let Some(ids) = lookup_user("sluice-test") {
            return Some(ids);
        }
        let out = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
            ])
            .arg("sluice-test")
            .output();
        // Another test process may have created it concurrently: look again.
        match lookup_user("sluice-test") {
            Some(ids) => Some(ids),
            None => panic!(
                "running as root: PostgreSQL needs an unprivileged OS user, and there is no \
                 `postgres` user and `useradd sluice-test` failed: {out:?}"
            ),
        }
    })
}

pub(super) fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let cname = CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: getpwnam_r with a zeroed passwd struct and a buffer we own;
    // `result` is only read after the call returns.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        );
        if rc != 0 || result.is_null() {
            return None;
        }
        Some((pwd.pw_uid, pwd.pw_gid))
    }
}

/// Configures `cmd` to run as the PostgreSQL OS user (when root) from `cwd`.
pub(super) fn as_pg_user(cmd: &mut Command, cwd: &Path) {
    cmd.current_dir(cwd).env("LC_ALL", "C").env_remove("PGDATA");
    if let Some((uid, gid)) = pg_user() {
        cmd.uid(uid).gid(gid);
    }
}

pub(super) fn chown_to_pg_user(path: &Path) {
    if let Some((uid, gid)) = pg_user() {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    }
}

/// A 0700 temp dir owned by the PostgreSQL OS user, in [`base_dir`], named
/// `sluice-pg-<pid>-<prefix>...` so that leftovers of dead test processes can
/// be recognised and removed.
pub(super) fn new_owned_tempdir(prefix: &str) -> tempfile::TempDir {
    let base = base_dir();
    let dir = tempfile::Builder::new()
        .prefix(&format!("{STALE_PREFIX}{}-{prefix}", std::process::id()))
        .tempdir_in(base)
        .unwrap_or_else(|e| panic!("cannot create a temp dir in {}: {e}", base.display()));
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).expect("chmod temp dir");
    chown_to_pg_user(dir.path());
    dir
}

pub(super) const STALE_PREFIX: &str = "sluice-pg-";

/// Where server directories go: `PGTEST_TMPDIR` if set, else `/dev/shm`
/// when it is a tmpfs with room (copying a data directory there is ~10x
/// faster than on a disk), else `/tmp` (when root, so the PostgreSQL user can
/// reach it whatever TMPDIR says) or the usual temp dir.
pub(super) fn base_dir() -> &'static Path {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        let base = if let Some(dir) = std::env::var_os("PGTEST_TMPDIR") {
            PathBuf::from(dir)
        } else if free_bytes(Path::new("/dev/shm")) >= 2 << 30 {
            PathBuf::from("/dev/shm")
        } else if pg_user().is_some() {
            PathBuf::from("/tmp")
        } else {
            std::env::temp_dir()
        };
        remove_stale_dirs(&base);
        base
    })
}

pub(super) fn free_bytes(path: &Path) -> u64 {
    let Ok(cpath) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return 0;
    };
    // SAFETY: statvfs(3) on a NUL-terminated path into a zeroed struct we own.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(cpath.as_ptr(), &mut st) != 0
            || libc::access(cpath.as_ptr(), libc::W_OK) != 0
        {
            return 0;
        }
        st.f_bavail as u64 * st.f_frsize as u64
    }
}

/// Removes `sluice-pg-<pid>-*` dirs of test processes that no longer exist,
/// first stopping a postmaster they left running.
pub(super) fn remove_stale_dirs(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(STALE_PREFIX))
            .and_then(|rest| rest.split('-').next()?.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let pidfile = e.path().join("data").join("postmaster.pid");
        if let Some(pm) = fs::read_to_string(pidfile)
            .ok()
            .and_then(|t| t.lines().next()?.trim().parse::<libc::pid_t>().ok())
        {
            let cmdline = fs::read(format!("/proc/{pm}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains("postgres") {
                // SAFETY: kill(2) on a postmaster left behind by a dead test process.
                unsafe {
                    libc::kill(pm, libc::SIGQUIT);
                }
            }
        }
        let _ = fs::remove_dir_all(e.path());
    }
}

// ---------------------------------------------------------------------------
// Ports.

pub(super) static PORTS_IN_USE: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A port that was free a moment ago and that no other server of this
/// process uses. (The race with other processes is handled by retrying.)
pub fn pick_port() -> u16 {
    let mut used = PORTS_IN_USE.lock().unwrap_or_else(|e| e.into_inner());
    let used = used.get_or_insert_with(HashSet::new);
    for _ in 0..100 {
        let listener =
            TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        if used.insert(port) {
            return port;
        }
    }
    panic!("could not find a free TCP port on 127.0.0.1");
}

pub(super) fn release_port(port: u16) {
    let mut used = PORTS_IN_USE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(used) = used.as_mut() {
        used.remove(&port);
    }
}
