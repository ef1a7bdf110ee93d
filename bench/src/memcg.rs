//! A memory cgroup for the pread baseline, so that its page cache gets as many bytes as
//! corebuf's cache: equal memory.
//!
//! The process moves itself into a fresh cgroup whose limit is the cache size (cgroup v1
//! `memory.limit_in_bytes` or v2 `memory.max`, whichever this kernel mounts with the memory
//! controller) for the pread side only, and back when the [`MemoryLimit`] is dropped. The new
//! cgroup is a child of the process's own, so it adds a limit inside whatever limits the
//! process already runs under and never leaves them (v2 allows that only where the own cgroup
//! may delegate the memory controller; elsewhere the side says it is not limited). Moving a
//! process does not move the memory it already has (v1 without `move_charge_at_immigrate`,
//! and v2 never does), so what the limit covers is what the pread side brings in: the page
//! cache of the dataset, plus its own few allocations (buffers, histograms, key rings). The
//! limit is reclaim, not failure: past it the kernel evicts page cache, as corebuf evicts.
//! Only the pread side runs while the process is inside (the sides run one after another).

use std::path::{Path, PathBuf};

/// The process inside a memory cgroup; dropping it moves the process back and removes the
/// cgroup.
#[derive(Debug)]
pub struct MemoryLimit {
    /// The cgroup's limit in bytes.
    pub limit_bytes: u64,
    /// The control file that holds the limit (`memory.limit_in_bytes` or `memory.max`).
    pub control: &'static str,
    dir: PathBuf,
    origin: PathBuf,
}

impl MemoryLimit {
    /// Moves this process into a new memory cgroup limited to `limit_bytes`, or says why it
    /// cannot (not root, no memory controller, a refused write).
    pub fn enter(limit_bytes: u64) -> Result<MemoryLimit, String> {
        // SAFETY: geteuid has no preconditions and touches no memory.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not running as root, so no memory cgroup can be made".into());
        }
        let mounts = std::fs::read_to_string("/proc/self/mounts")
            .map_err(|e| format!("reading /proc/self/mounts: {e}"))?;
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("reading /proc/self/cgroup: {e}"))?;
        let (root, control, own_path, v2) = if let Some(root) = v1_memory_root(&mounts) {
            let own_path =
                own_cgroup(&own, |controllers| controllers.split(',').any(|c| c == "memory"))
                    .unwrap_or_else(|| "/".into());
            (root, "memory.limit_in_bytes", own_path, false)
        } else if let Some(root) = v2_root_with_memory(&mounts) {
            let own_path = own_cgroup(&own, str::is_empty).unwrap_or_else(|| "/".into());
            (root, "memory.max", own_path, true)
        } else {
            return Err("this kernel mounts no cgroup with the memory controller".into());
        };
        let origin = root.join(own_path.trim_start_matches('/'));
        if v2 {
            // The own cgroup's subtree must offer the controller to the child.
            write(&origin.join("cgroup.subtree_control"), "+memory")?;
        }
        let dir = origin.join(format!("corebuf-bench-pread-{}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let limit = MemoryLimit { limit_bytes, control, dir, origin };
        write(&limit.dir.join(control), &limit_bytes.to_string())?;
        write(&limit.dir.join("cgroup.procs"), &std::process::id().to_string())?;
        Ok(limit)
    }

    /// What the report says about the limit.
    pub fn describe(&self) -> String {
        format!(
            "ran in a memory cgroup limited to {} ({} of {}): page cache and its own \
             allocations, equal to corebuf's cache",
            crate::args::human_bytes(self.limit_bytes),
            self.control,
            self.dir.display()
        )
    }
}

impl Drop for MemoryLimit {
    fn drop(&mut self) {
        let pid = std::process::id().to_string();
        if let Err(e) = write(&self.origin.join("cgroup.procs"), &pid) {
            eprintln!("corebuf-bench: could not leave the pread memory cgroup: {e}");
            return;
        }
        // The page cache charged to it goes to the parent (v1) or lingers until reclaimed.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value).map_err(|e| format!("writing {value} to {}: {e}", path.display()))
}

/// The mount point of the cgroup v1 hierarchy with the memory controller.
fn v1_memory_root(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (point, kind, options) = (fields.get(1)?, fields.get(2)?, fields.get(3)?);
        (*kind == "cgroup" && options.split(',').any(|o| o == "memory"))
            .then(|| PathBuf::from(point))
    })
}

/// The mount point of a cgroup v2 hierarchy whose root offers the memory controller.
fn v2_root_with_memory(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (point, kind) = (fields.get(1)?, fields.get(2)?);
        if *kind != "cgroup2" {
            return None;
        }
        let root = PathBuf::from(point);
        let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).ok()?;
        controllers.split_whitespace().any(|c| c == "memory").then_some(root)
    })
}

/// This process's cgroup path in the hierarchy whose controller list passes `wanted`, from
/// /proc/self/cgroup (`id:controllers:path` lines; v2's line has an empty list).
fn own_cgroup(text: &str, wanted: impl Fn(&str) -> bool) -> Option<String> {
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        wanted(controllers).then(|| path.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_and_own_cgroup_parse() {
        let mounts = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n\
                      cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(v1_memory_root(mounts), Some(PathBuf::from("/sys/fs/cgroup/memory")));
        assert_eq!(v1_memory_root("cgroup /x cgroup rw,cpu 0 0\n"), None);
        let own = "12:pids:/a\n4:memory:/user.slice/x\n0::/init.scope\n";
        let memory = |c: &str| c.split(',').any(|c| c == "memory");
        assert_eq!(own_cgroup(own, memory), Some("/user.slice/x".into()));
        assert_eq!(own_cgroup(own, str::is_empty), Some("/init.scope".into()));
    }
}
