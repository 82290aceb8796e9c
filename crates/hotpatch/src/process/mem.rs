//! Target memory through `/proc/PID/mem`: `pread`/`pwrite` on one open fd.
//!
//! Writes go through the kernel's `FOLL_FORCE` path, so they work on
//! read-only code pages too (private file pages are copied on write; the
//! file on disk never changes). A write is one kernel `memcpy`: it is not
//! atomic for a thread running concurrently over those bytes (DESIGN.md §2).

use super::ProcessError;
use crate::image::hex;
use std::fs::File;
use std::os::unix::fs::FileExt;

/// The most ranges one `process_vm_readv` takes (`UIO_MAXIOV`).
pub const IOV_MAX: usize = 1024;

/// An open `/proc/PID/mem`.
#[derive(Debug)]
pub struct Mem {
    pid: i32,
    file: File,
}

impl Mem {
    /// Open the memory of `pid` for reading and writing.
    pub fn open(pid: i32) -> Result<Mem, ProcessError> {
        let path = std::path::PathBuf::from(format!("/proc/{pid}/mem"));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| ProcessError::from_io(pid, path, e))?;
        Ok(Mem { pid, file })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    fn mem_error(&self, op: &'static str, addr: u64, len: usize, source: std::io::Error) -> ProcessError {
        ProcessError::Mem {
            pid: self.pid,
            op,
            addr,
            len,
            error: source,
        }
    }

    /// A range that wraps around the address space (from a bad record)
    /// is an error, not an overflow.
    fn check_range(&self, op: &'static str, addr: u64, len: usize) -> Result<(), ProcessError> {
        match addr.checked_add(len as u64) {
            Some(_) => Ok(()),
            None => Err(self.mem_error(
                op,
                addr,
                len,
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "the range wraps around"),
            )),
        }
    }

    /// Fill `buf` from `addr`. A short read (the range runs into unmapped
    /// memory, or the process has exited) is an error.
    pub fn read_into(&self, addr: u64, buf: &mut [u8]) -> Result<(), ProcessError> {
        self.check_range("read", addr, buf.len())?;
        let mut done = 0;
        while done < buf.len() {
            let at = addr + done as u64;
            match self.file.read_at(&mut buf[done..], at) {
                Ok(0) => {
                    let e = std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "short read (unmapped, or the process exited)",
                    );
                    return Err(self.mem_error("read", addr, buf.len(), e));
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.mem_error("read", addr, buf.len(), e)),
            }
        }
        Ok(())
    }

    /// `len` bytes from `addr`.
    pub fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>, ProcessError> {
        let mut buf = vec![0; len];
        self.read_into(addr, &mut buf)?;
        Ok(buf)
    }

    /// Fill each of `bufs` from its address in `addrs`, many ranges per
    /// system call (`process_vm_readv`, at most [`IOV_MAX`] ranges each):
    /// one result per range. A range that call cannot read whole (it ends
    /// a call's transfer) is read again alone through `/proc/PID/mem`, for
    /// its data or its own error; the ranges after it go on in the next
    /// call. Where `process_vm_readv` is refused, every range is read
    /// through `/proc/PID/mem`.
    pub fn read_many(&self, addrs: &[u64], bufs: &mut [&mut [u8]]) -> Vec<Result<(), ProcessError>> {
        use nix::sys::uio::{RemoteIoVec, process_vm_readv};
        use std::io::IoSliceMut;
        let mut out: Vec<Result<(), ProcessError>> = Vec::with_capacity(bufs.len());
        let n = addrs.len().min(bufs.len());
        let mut batched = true;
        while out.len() < n {
            let first = out.len();
            let last = n.min(first + IOV_MAX);
            if !batched {
                let r = self.read_into(addrs[first], bufs[first]);
                out.push(r);
                continue;
            }
            if let Some(i) = (first..last).find(|&i| addrs[i].checked_add(bufs[i].len() as u64).is_none()) {
                // A wrapping range is that range's own error.
                for j in first..=i {
                    let r = self.read_into(addrs[j], bufs[j]);
                    out.push(r);
                }
                continue;
            }
            let remote: Vec<RemoteIoVec> = (first..last)
                .map(|i| RemoteIoVec {
                    base: addrs[i] as usize,
                    len: bufs[i].len(),
                })
                .collect();
            let lens: Vec<usize> = bufs[first..last].iter().map(|b| b.len()).collect();
            let mut local: Vec<IoSliceMut> =
                bufs[first..last].iter_mut().map(|b| IoSliceMut::new(b)).collect();
            let done = process_vm_readv(nix::unistd::Pid::from_raw(self.pid), &mut local, &remote);
            drop(local);
            let got = match done {
                Ok(got) => got,
                // The first range faults: nothing read.
                Err(nix::errno::Errno::EFAULT) => 0,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::debug!(
                        pid = self.pid,
                        "process_vm_readv: {e}; reading through /proc/PID/mem"
                    );
                    batched = false;
                    continue;
                }
            };
            let mut left = got;
            for (k, len) in lens.iter().enumerate() {
                if left >= *len {
                    left -= len;
                    out.push(Ok(()));
                } else {
                    // This range ended the transfer: alone, for its error.
                    let i = first + k;
                    let r = self.read_into(addrs[i], bufs[i]);
                    out.push(r);
                    break;
                }
            }
        }
        out
    }

    /// A little-endian `u64` at `addr`.
    pub fn read_u64(&self, addr: u64) -> Result<u64, ProcessError> {
        let mut b = [0u8; 8];
        self.read_into(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// A little-endian `u32` at `addr`.
    pub fn read_u32(&self, addr: u64) -> Result<u32, ProcessError> {
        let mut b = [0u8; 4];
        self.read_into(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// A NUL-terminated string at `addr`, at most `max` bytes long.
    pub fn read_c_string(&self, addr: u64, max: usize) -> Result<String, ProcessError> {
        let mut out = Vec::new();
        let mut at = addr;
        while out.len() < max {
            // Never read across a page boundary: the next page may be unmapped.
            let chunk = (0x1000 - (at & 0xfff)) as usize;
            let chunk = chunk.min(max - out.len());
            let bytes = self.read(at, chunk)?;
            if let Some(nul) = bytes.iter().position(|&b| b == 0) {
                out.extend_from_slice(&bytes[..nul]);
                return Ok(String::from_utf8_lossy(&out).into_owned());
            }
            out.extend_from_slice(&bytes);
            at += chunk as u64;
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Write `bytes` at `addr`, unconditionally.
    pub fn write(&self, addr: u64, bytes: &[u8]) -> Result<(), ProcessError> {
        self.check_range("write", addr, bytes.len())?;
        let mut done = 0;
        while done < bytes.len() {
            let at = addr + done as u64;
            match self.file.write_at(&bytes[done..], at) {
                Ok(0) => {
                    let e = std::io::Error::new(
                        std::io::ErrorKind::WriteZero,
                        "short write (unmapped, or the process exited)",
                    );
                    return Err(self.mem_error("write", addr, bytes.len(), e));
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.mem_error("write", addr, bytes.len(), e)),
            }
        }
        Ok(())
    }

    pub fn write_u64(&self, addr: u64, value: u64) -> Result<(), ProcessError> {
        self.write(addr, &value.to_le_bytes())
    }

    pub fn write_u32(&self, addr: u64, value: u32) -> Result<(), ProcessError> {
        self.write(addr, &value.to_le_bytes())
    }

    /// Compare-and-swap: read `expected.len()` bytes at `addr`; if they are
    /// not `expected`, fail naming what was found and write nothing.
    /// Otherwise write `new` and read it back.
    ///
    /// Not atomic against the target's own threads (nothing through
    /// `/proc/PID/mem` is): it protects against a wrong plan, another tool,
    /// or a stale view, not against a racing writer inside the target.
    pub fn write_expecting(&self, addr: u64, expected: &[u8], new: &[u8]) -> Result<(), ProcessError> {
        // The writes may come from a record read from the process itself.
        if expected.len() != new.len() {
            return Err(ProcessError::Mismatch {
                pid: self.pid,
                addr,
                expected: format!(
                    "{} ({} bytes, to be replaced by {} bytes: a compare-and-swap needs the same length)",
                    hex(expected),
                    expected.len(),
                    new.len()
                ),
                found: "nothing read".into(),
            });
        }
        let found = self.read(addr, expected.len())?;
        if found != expected {
            return Err(ProcessError::Mismatch {
                pid: self.pid,
                addr,
                expected: hex(expected),
                found: hex(&found),
            });
        }
        self.write(addr, new)?;
        let back = self.read(addr, new.len())?;
        if back != new {
            return Err(ProcessError::WriteNotVisible {
                pid: self.pid,
                addr,
                len: new.len(),
                found: hex(&back),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_and_swap_on_own_memory() {
        let buf = Box::new([1u8, 2, 3, 4]);
        let addr = buf.as_ptr() as u64;
        let mem = Mem::open(std::process::id() as i32).unwrap();
        let err = mem
            .write_expecting(addr, &[9, 9, 9, 9], &[5, 6, 7, 8])
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&format!("{addr:#x}")), "{msg}");
        assert!(
            msg.contains("expected bytes 09090909 but found 01020304"),
            "{msg}"
        );
        assert_eq!(mem.read(addr, 4).unwrap(), [1, 2, 3, 4], "nothing written");
        mem.write_expecting(addr, &[1, 2, 3, 4], &[5, 6, 7, 8]).unwrap();
        assert_eq!(mem.read(addr, 4).unwrap(), [5, 6, 7, 8]);
        assert_eq!(mem.read_u32(addr).unwrap(), u32::from_le_bytes([5, 6, 7, 8]));
        drop(buf);
    }

    /// A compare-and-swap of different lengths (a forged record) and a
    /// range wrapping around are errors, never panics; nothing is written.
    #[test]
    fn bad_writes_are_errors() {
        let buf = Box::new([1u8, 2, 3, 4]);
        let addr = buf.as_ptr() as u64;
        let mem = Mem::open(std::process::id() as i32).unwrap();
        let err = mem.write_expecting(addr, &[1, 2], &[5, 6, 7]).unwrap_err();
        assert!(err.to_string().contains("same length"), "{err}");
        assert_eq!(mem.read(addr, 4).unwrap(), [1, 2, 3, 4]);
        assert!(mem.read(u64::MAX - 1, 4).is_err());
        assert!(mem.write(u64::MAX - 1, &[0; 4]).is_err());
        drop(buf);
    }

    /// Many ranges per call, each with its own result: an unmapped or a
    /// wrapping range in the middle fails alone, the ranges after it are
    /// still read, over more than one call's worth of ranges.
    #[test]
    fn reads_many_ranges_each_with_its_result() {
        let data: Vec<u8> = (0..IOV_MAX as u32 * 3).map(|i| (i * 7 + 1) as u8).collect();
        let base = data.as_ptr() as u64;
        let mem = Mem::open(std::process::id() as i32).unwrap();
        let mut addrs: Vec<u64> = (0..IOV_MAX as u64 + 300).map(|i| base + i).collect();
        let mut lens: Vec<usize> = (0..addrs.len()).map(|i| 1 + i % 9).collect();
        let bad = [5, 700, IOV_MAX - 1, IOV_MAX + 10];
        addrs[bad[0]] = 8;
        addrs[bad[1]] = u64::MAX - 1;
        addrs[bad[2]] = 16;
        lens[bad[3]] = 0;
        let mut store: Vec<Vec<u8>> = lens.iter().map(|&l| vec![0xee; l]).collect();
        let mut bufs: Vec<&mut [u8]> = store.iter_mut().map(|v| v.as_mut_slice()).collect();
        let results = mem.read_many(&addrs, &mut bufs);
        assert_eq!(results.len(), addrs.len());
        for (i, r) in results.iter().enumerate() {
            if bad[..3].contains(&i) {
                assert!(r.is_err(), "range {i} must fail");
            } else {
                assert!(r.is_ok(), "range {i}: {r:?}");
                let at = (addrs[i] - base) as usize;
                assert_eq!(store[i], data[at..at + lens[i]], "range {i}");
            }
        }
    }

    #[test]
    fn unmapped_memory_is_an_error() {
        let mem = Mem::open(std::process::id() as i32).unwrap();
        let err = mem.read(8, 8).unwrap_err();
        assert!(matches!(err, ProcessError::Mem { addr: 8, len: 8, .. }), "{err}");
    }

    #[test]
    fn reads_c_strings_across_pages() {
        let s = b"hello, target\0";
        let mem = Mem::open(std::process::id() as i32).unwrap();
        assert_eq!(
            mem.read_c_string(s.as_ptr() as u64, 100).unwrap(),
            "hello, target"
        );
        assert_eq!(mem.read_c_string(s.as_ptr() as u64, 5).unwrap(), "hello");
    }
}
