//! A command run as from a login over ssh: the leader of its own session, a pseudo-terminal
//! its controlling terminal and its stdin, stdout and stderr. Dropping the terminal's master
//! side is the connection dropping: the kernel hangs the terminal up and sends SIGHUP to the
//! session's leader, and writes to the terminal fail from then on.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

pub struct Terminal {
    master: File,
    seen: String,
}

impl Terminal {
    /// Starts `command` on a new pseudo-terminal. The command is dropped with its copies of
    /// the terminal, so a read sees the end once the child's are closed.
    pub fn start(mut command: Command) -> (Child, Terminal) {
        // Opened close-on-exec (as std opens every file), so no child of a parallel test holds
        // it open past our drop.
        let master =
            OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOCTTY).open("/dev/ptmx").unwrap();
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: a valid master descriptor and a buffer of the length given.
        unsafe {
            assert_eq!(libc::unlockpt(master.as_raw_fd()), 0);
            assert_eq!(libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()), 0);
        }
        // SAFETY: ptsname_r wrote a NUL-terminated path.
        let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }.to_str().unwrap().to_owned();
        let slave =
            OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOCTTY).open(path).unwrap();
        command.stdin(slave.try_clone().unwrap()).stdout(slave.try_clone().unwrap()).stderr(slave);
        // SAFETY: setsid and ioctl are async-signal-safe, as between fork and exec.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().unwrap();
        (child, Terminal { master, seen: String::new() })
    }

    /// Reads what the command writes until `text` has appeared; all it wrote if it never does.
    pub fn wait_for(&mut self, text: &str) -> Result<(), String> {
        let mut buf = [0; 4096];
        while !self.seen.contains(text) {
            match self.master.read(&mut buf) {
                Ok(n) if n > 0 => self.seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                // EIO: every process of the terminal has closed it.
                _ => return Err(std::mem::take(&mut self.seen)),
            }
        }
        Ok(())
    }
}
