//! A host name of the test's own in `/etc/hosts`, which it can move from one address to
//! another (a failover's DNS change) and removes when dropped.
//!
//! Other tests read the file meanwhile, so it is never rewritten: the entry is appended in one
//! write, moved by overwriting its address in place (addresses of one length), and removed by
//! truncating the file back to its old length.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;

const HOSTS: &str = "/etc/hosts";

pub struct HostsEntry {
    pub name: String,
    /// Where the address starts in the file, and its length.
    at: u64,
    len: usize,
    /// The file's length before the entry.
    before: u64,
}

impl HostsEntry {
    /// Adds `name` (made unique to this process) at `addr`. Panics when the file cannot be
    /// written (the test needs root).
    pub fn add(name: &str, addr: &str) -> HostsEntry {
        let name = format!("{name}-{}", std::process::id());
        let text = std::fs::read(HOSTS).unwrap_or_else(|e| panic!("read {HOSTS}: {e}"));
        let newline = if text.last().is_some_and(|&b| b != b'\n') {
            "\n"
        } else {
            ""
        };
        let mut f = OpenOptions::new()
            .append(true)
            .open(HOSTS)
            .unwrap_or_else(|e| panic!("{HOSTS} must be writable for this test (root): {e}"));
        f.write_all(format!("{newline}{addr} {name}\n").as_bytes())
            .expect("append to /etc/hosts");
        HostsEntry {
            name,
            at: (text.len() + newline.len()) as u64,
            len: addr.len(),
            before: text.len() as u64,
        }
    }

    /// Points the name at `addr`, of the same length as the first address.
    pub fn point_at(&self, addr: &str) {
        assert_eq!(addr.len(), self.len, "addresses of one length");
        let f = OpenOptions::new()
            .write(true)
            .open(HOSTS)
            .expect("open /etc/hosts");
        f.write_all_at(addr.as_bytes(), self.at)
            .expect("write /etc/hosts");
    }
}

impl Drop for HostsEntry {
    fn drop(&mut self) {
        if let Ok(f) = OpenOptions::new().write(true).open(HOSTS) {
            let _ = f.set_len(self.before);
        }
    }
}
