//! The few `bpf(2)` commands aya 0.14 does not expose for links: open a
//! pinned object as a plain descriptor, pin one, detach one at once, and
//! read a link's full info (aya's `LinkInfo` hides the XDP link's interface index, which is
//! how a link that lost its interface is told from a live one).

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_DETACH: libc::c_long = 34;
/// `bpf_link_type` of an XDP attachment.
pub const BPF_LINK_TYPE_XDP: u32 = 6;

/// The `BPF_OBJ_PIN` / `BPF_OBJ_GET` part of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    /// Path in bpffs, as a user pointer.
    pathname: u64,
    /// The object to pin (`BPF_OBJ_PIN`); 0 for `BPF_OBJ_GET`.
    bpf_fd: u32,
    /// Open flags; 0 is read-write.
    file_flags: u32,
}

/// The `BPF_OBJ_GET_INFO_BY_FD` part of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    /// The object asked about.
    bpf_fd: u32,
    /// Size of the buffer below; the kernel writes back what it filled.
    info_len: u32,
    /// User pointer to a `struct bpf_link_info`.
    info: u64,
}

/// The `BPF_LINK_DETACH` part of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct DetachAttr {
    /// The link to detach.
    link_fd: u32,
}

/// `struct bpf_link_info` as far as an XDP link needs: the union that
/// follows `prog_id` is 8-byte aligned, and for XDP starts with `ifindex`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RawLinkInfo {
    /// `bpf_link_type`.
    link_type: u32,
    /// The link's id.
    id: u32,
    /// The program it runs.
    prog_id: u32,
    /// Padding to the union.
    _pad: u32,
    /// First word of the union: the XDP link's interface index.
    ifindex: u32,
    /// The rest of the largest union member the kernel may write.
    _rest: [u32; 11],
}

/// What the kernel says about one link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkFacts {
    /// `bpf_link_type` (6 for XDP).
    pub link_type: u32,
    /// The link's id.
    pub id: u32,
    /// The program attached through it.
    pub prog_id: u32,
    /// The interface it is attached to; 0 once that interface is gone
    /// (the link is then "severed" and guards nothing).
    pub ifindex: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialised prefix of `union bpf_attr`
    // of the size given; the kernel zero-extends shorter attributes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<libc::c_void>(),
            size_of::<T>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in a pin path"))
}

/// Opens the object pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        ..ObjAttr::default()
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("descriptor out of range"))?;
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Pins the object behind `fd` at `path`.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: u32::try_from(fd.as_raw_fd()).map_err(|_| io::Error::other("bad descriptor"))?,
        file_flags: 0,
    };
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// The kernel's facts about the link behind `fd`.
pub fn link_facts(fd: BorrowedFd<'_>) -> io::Result<LinkFacts> {
    let mut info = RawLinkInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: u32::try_from(fd.as_raw_fd()).map_err(|_| io::Error::other("bad descriptor"))?,
        info_len: u32::try_from(size_of::<RawLinkInfo>()).unwrap_or(u32::MAX),
        info: std::ptr::from_mut(&mut info) as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(LinkFacts {
        link_type: info.link_type,
        id: info.id,
        prog_id: info.prog_id,
        ifindex: if info.link_type == BPF_LINK_TYPE_XDP {
            info.ifindex
        } else {
            0
        },
    })
}

/// Detaches the link behind `fd` from its hook now. Dropping the last
/// reference to a link (closing it, unpinning it) releases it from a
/// kernel work queue a moment later; an operator who asked for the gate
/// to open, and a test that checks it did, need it gone when we return.
pub fn link_detach(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = DetachAttr {
        link_fd: u32::try_from(fd.as_raw_fd()).map_err(|_| io::Error::other("bad descriptor"))?,
    };
    bpf(BPF_LINK_DETACH, &mut attr).map(drop)
}

/// The link pinned at `path`, with its facts.
pub fn pinned_link(path: &Path) -> io::Result<(OwnedFd, LinkFacts)> {
    let fd = obj_get(path)?;
    let facts = {
        use std::os::fd::AsFd as _;
        link_facts(fd.as_fd())?
    };
    Ok((fd, facts))
}

/// The index of the interface called `name` now, if there is one.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: a valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}
