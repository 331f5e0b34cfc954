//! CPU time of processes, from `/proc/PID/stat` (user + system, in clock ticks).

use std::collections::HashMap;

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux in practice).
pub fn ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100)
}

/// (ppid, utime + stime) of one process.
fn stat(pid: u32) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: parse after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); ppid is field 4, utime 14, stime 15.
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// CPU ticks used so far by `pid` (all its threads).
pub fn cpu_ticks(pid: u32) -> u64 {
    stat(pid).map(|(_, t)| t).unwrap_or(0)
}

/// CPU ticks used so far by `pid` and every live descendant (a launcher and its workers).
pub fn tree_cpu_ticks(root: u32) -> u64 {
    let mut parent: HashMap<u32, (u32, u64)> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            if let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            {
                if let Some(s) = stat(pid) {
                    parent.insert(pid, s);
                }
            }
        }
    }
    let in_tree = |mut pid: u32| {
        for _ in 0..64 {
            if pid == root {
                return true;
            }
            match parent.get(&pid) {
                Some(&(ppid, _)) if ppid != 0 => pid = ppid,
                _ => return false,
            }
        }
        false
    };
    parent
        .iter()
        .filter(|(&pid, _)| in_tree(pid))
        .map(|(_, &(_, t))| t)
        .sum()
}
