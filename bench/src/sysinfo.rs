//! What the host says about memory, cores, file systems and disks (Linux /proc and /sys).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

fn status_kib(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    kib_field(&text, field)
}

fn kib_field(text: &str, field: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(field))?;
    line[field.len()..].trim_start_matches(':').split_whitespace().next()?.parse().ok()
}

/// `MemAvailable` from /proc/meminfo, bytes (`u64::MAX` if it cannot be read).
pub fn mem_available_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| kib_field(&t, "MemAvailable"))
        .map_or(u64::MAX, |kib| kib * 1024)
}

/// Online cores.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Resident memory now and its peak since the last [`reset_peak_rss`] (VmRSS, VmHWM), bytes.
pub fn rss_bytes() -> (u64, u64) {
    let rss = status_kib("VmRSS").unwrap_or(0) * 1024;
    let peak = status_kib("VmHWM").unwrap_or(0) * 1024;
    (rss, peak)
}

/// Resets the peak RSS to the current RSS (writes 5 to /proc/self/clear_refs; Linux ≥ 4.0).
/// Returns whether it worked.
///
/// First it hands memory that earlier sides freed back to the kernel (`malloc_trim`): glibc
/// keeps freed heap pages resident, and a side's RSS must not include another side's (or an
/// earlier scenario's) generator rings and histograms.
pub fn reset_peak_rss() -> bool {
    // SAFETY: malloc_trim only returns free heap memory to the kernel; it takes no pointer.
    unsafe { libc::malloc_trim(0) };
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Whether `dir` is on tmpfs or ramfs, where `O_DIRECT` does not exist.
pub fn is_memory_fs(dir: &Path) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    let Ok(c_path) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes one `struct statfs` through the pointer, which points at a zeroed
    // local of that type; the path is a valid NUL-terminated string that outlives the call.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
    rc == 0 && matches!(stat.f_type as i64, TMPFS_MAGIC | RAMFS_MAGIC)
}

/// Completed reads and writes of the block device holding `path`, from
/// /sys/dev/block/MAJ:MIN/stat (`None` when there is no such device, e.g. overlay).
pub fn disk_ios(path: &Path) -> Option<u64> {
    let dev = std::fs::metadata(path).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let text = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/stat")).ok()?;
    let fields: Vec<u64> = text.split_whitespace().filter_map(|f| f.parse().ok()).collect();
    Some(fields.first()? + fields.get(4)?)
}

/// Drops the page cache of `file` (after writing it back), so each side starts cold.
pub fn drop_page_cache(file: &std::fs::File) {
    use std::os::fd::AsRawFd;
    let _ = file.sync_data();
    // SAFETY: posix_fadvise on an open descriptor; no memory is passed.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// Whether an executable named `program` is on PATH.
pub fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Some(paths) = std::env::var_os("PATH") else { return false };
    std::env::split_paths(&paths).any(|dir| {
        std::fs::metadata(dir.join(program))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_fields_parse() {
        assert_eq!(
            kib_field("MemTotal: 10 kB\nMemAvailable:   2048 kB\n", "MemAvailable"),
            Some(2048)
        );
        assert!(mem_available_bytes() > 0);
        let (rss, peak) = rss_bytes();
        assert!(rss > 0 && peak >= rss);
    }
}
