//! NVIDIA MIG instances through NVML's C API: the profiles and placements a
//! GPU offers, the instances on it, and making and removing them.
//!
//! `nvml-wrapper` 0.13 reads a GPU's MIG mode and lists its MIG devices, but
//! has no safe call to read GPU instance profiles and placements or to make
//! and remove GPU and compute instances. Those calls are made here through
//! its raw bindings (`Nvml::lib()` for the loaded library's functions,
//! `Device::handle()` for the device), so this is the workspace's one crate
//! with `unsafe` code; every other crate forbids it. Each block says why it
//! is sound. Nothing here runs without a GPU in MIG mode: the agent's logic
//! around it is tested with a fake library, and this is exercised on a GPU
//! machine.
//!
//! Every instance made here is a GPU instance at an explicit placement with
//! one compute instance spanning it, which is what a DRA partition stands
//! for.

use std::os::raw::{c_char, c_uint};

use nvml_wrapper::error::{NvmlError, nvml_sym, nvml_try};
use nvml_wrapper::{Device, Nvml};
use nvml_wrapper_sys::bindings as sys;

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum MigError {
    /// NVML refused or failed.
    #[error("NVML: {0}")]
    Nvml(#[from] NvmlError),
    /// NVML answered something this crate cannot use.
    #[error("{0}")]
    Unexpected(String),
}

/// One GPU instance profile of a GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// NVML's profile ID.
    pub id: u32,
    /// Its name without NVML's `MIG ` prefix (`1g.10gb`).
    pub name: String,
    /// Memory of an instance, MiB.
    pub memory_mib: u64,
    /// Streaming multiprocessors of an instance.
    pub multiprocessors: u32,
    /// Compute slices of an instance.
    pub slices: u32,
    /// Where an instance may go: (first memory slice, memory slices).
    pub placements: Vec<(u32, u32)>,
}

/// A GPU instance on a GPU, with its compute instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// The profile it was made with.
    pub profile: u32,
    /// First memory slice of its placement.
    pub start: u32,
    /// Memory slices it takes.
    pub size: u32,
    /// GPU instance ID.
    pub gpu_instance: u32,
    /// Compute instance ID (the first one, where it has several).
    pub compute_instance: u32,
    /// The `MIG-…` UUID of the MIG device they make.
    pub uuid: String,
}

/// `NVML_STRUCT_VERSION(GpuInstanceProfileInfo, 2)` from `nvml.h`.
fn profile_info_v2_version() -> c_uint {
    (std::mem::size_of::<sys::nvmlGpuInstanceProfileInfo_v2_t>() as c_uint) | (2 << 24)
}

fn c_string(buf: &[c_char]) -> String {
    let bytes: Vec<u8> = buf
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Whether `e` says the thing asked about does not exist or is not offered.
fn absent(e: &NvmlError) -> bool {
    matches!(
        e,
        NvmlError::NotFound | NvmlError::NotSupported | NvmlError::InvalidArg
    )
}

/// Whether MIG mode is on now on `dev`.
pub fn enabled(dev: &Device) -> bool {
    dev.mig_mode().is_ok_and(|m| m.current == 1)
}

/// The GPU instance profiles `dev` offers, with their placements. Profiles
/// the GPU does not support are left out.
pub fn profiles(nvml: &Nvml, dev: &Device) -> Result<Vec<Profile>, MigError> {
    let lib = nvml.lib();
    let info_v2 = nvml_sym(lib.nvmlDeviceGetGpuInstanceProfileInfoV.as_ref())?;
    let placements_of = nvml_sym(lib.nvmlDeviceGetGpuInstancePossiblePlacements_v2.as_ref())?;
    // SAFETY: the handle belongs to `dev`, which borrows `nvml`; both live
    // through every call below.
    let handle = unsafe { dev.handle() };
    let mut out = Vec::new();
    for p in 0..sys::NVML_GPU_INSTANCE_PROFILE_COUNT {
        // SAFETY: an all-zero value is valid for this plain C struct.
        let mut info: sys::nvmlGpuInstanceProfileInfo_v2_t = unsafe { std::mem::zeroed() };
        info.version = profile_info_v2_version();
        // SAFETY: `info` is a writable struct of the version set in it.
        match nvml_try(unsafe { info_v2(handle, p, &mut info) }) {
            Ok(()) => {}
            Err(e) if absent(&e) => continue,
            Err(e) => return Err(e.into()),
        }
        let mut count: c_uint = 0;
        // SAFETY: a null array asks NVML for the count only.
        let r = unsafe { placements_of(handle, info.id, std::ptr::null_mut(), &mut count) };
        match nvml_try(r) {
            Ok(()) | Err(NvmlError::InsufficientSize(_)) => {}
            Err(e) if absent(&e) => continue,
            Err(e) => return Err(e.into()),
        }
        let mut placements =
            vec![sys::nvmlGpuInstancePlacement_t { start: 0, size: 0 }; count as usize];
        if count > 0 {
            // SAFETY: `placements` holds `count` writable entries, and
            // NVML writes at most `count` and sets `count` to how many.
            nvml_try(unsafe {
                placements_of(handle, info.id, placements.as_mut_ptr(), &mut count)
            })?;
            placements.truncate(count as usize);
        }
        let name = c_string(&info.name);
        out.push(Profile {
            id: info.id,
            name: name.strip_prefix("MIG ").unwrap_or(&name).to_string(),
            memory_mib: info.memorySizeMB,
            multiprocessors: info.multiprocessorCount,
            slices: info.sliceCount,
            placements: placements.iter().map(|p| (p.start, p.size)).collect(),
        });
    }
    Ok(out)
}

/// The info of compute instance profile index `p` of GPU instance `gi`;
/// `None` where the GPU instance does not offer it.
fn compute_profile(
    nvml: &Nvml,
    gi: sys::nvmlGpuInstance_t,
    p: c_uint,
) -> Result<Option<sys::nvmlComputeInstanceProfileInfo_t>, MigError> {
    let info_of = nvml_sym(
        nvml.lib()
            .nvmlGpuInstanceGetComputeInstanceProfileInfo
            .as_ref(),
    )?;
    // SAFETY: an all-zero value is valid for this plain C struct.
    let mut info: sys::nvmlComputeInstanceProfileInfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `gi` is a live GPU instance handle; `info` is writable.
    let r = unsafe {
        info_of(
            gi,
            p,
            sys::NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED,
            &mut info,
        )
    };
    match nvml_try(r) {
        Ok(()) => Ok(Some(info)),
        Err(e) if absent(&e) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The compute instance profile spanning a whole GPU instance: the one
/// with the most slices.
fn spanning_compute_profile(nvml: &Nvml, gi: sys::nvmlGpuInstance_t) -> Result<c_uint, MigError> {
    let mut best: Option<(u32, c_uint)> = None;
    for p in 0..sys::NVML_COMPUTE_INSTANCE_PROFILE_COUNT {
        let Some(info) = compute_profile(nvml, gi, p)? else {
            continue;
        };
        if best.is_none_or(|(slices, _)| info.sliceCount > slices) {
            best = Some((info.sliceCount, info.id));
        }
    }
    best.map(|(_, id)| id).ok_or_else(|| {
        MigError::Unexpected("the GPU instance offers no compute instance profile".into())
    })
}

/// The `MIG-…` UUID of the MIG device of GPU instance `gi` and compute
/// instance `ci` on `dev`.
fn mig_uuid(nvml: &Nvml, dev: &Device, gi: u32, ci: u32) -> Result<String, MigError> {
    let lib = nvml.lib();
    let max = nvml_sym(lib.nvmlDeviceGetMaxMigDeviceCount.as_ref())?;
    let by_index = nvml_sym(lib.nvmlDeviceGetMigDeviceHandleByIndex.as_ref())?;
    let gi_of = nvml_sym(lib.nvmlDeviceGetGpuInstanceId.as_ref())?;
    let ci_of = nvml_sym(lib.nvmlDeviceGetComputeInstanceId.as_ref())?;
    let uuid_of = nvml_sym(lib.nvmlDeviceGetUUID.as_ref())?;
    // SAFETY: as in `profiles`.
    let handle = unsafe { dev.handle() };
    let mut n: c_uint = 0;
    // SAFETY: `n` is writable.
    nvml_try(unsafe { max(handle, &mut n) })?;
    for i in 0..n {
        let mut mig: sys::nvmlDevice_t = std::ptr::null_mut();
        // SAFETY: `mig` is writable; an index without a MIG device answers
        // NOT_FOUND.
        match nvml_try(unsafe { by_index(handle, i, &mut mig) }) {
            Ok(()) => {}
            Err(e) if absent(&e) => continue,
            Err(e) => return Err(e.into()),
        }
        let (mut g, mut c): (c_uint, c_uint) = (0, 0);
        // SAFETY: `mig` is the MIG device handle NVML just gave; `g` is
        // writable.
        let got_gi = nvml_try(unsafe { gi_of(mig, &mut g) });
        // SAFETY: as above, `c` is writable.
        let got_ci = nvml_try(unsafe { ci_of(mig, &mut c) });
        if got_gi.is_err() || got_ci.is_err() {
            continue;
        }
        if (g, c) != (gi, ci) {
            continue;
        }
        let mut buf = [0 as c_char; sys::NVML_DEVICE_UUID_V2_BUFFER_SIZE as usize];
        // SAFETY: `buf` holds the length passed.
        nvml_try(unsafe { uuid_of(mig, buf.as_mut_ptr(), buf.len() as c_uint) })?;
        return Ok(c_string(&buf));
    }
    Err(MigError::Unexpected(format!(
        "no MIG device for GPU instance {gi}, compute instance {ci}"
    )))
}

/// Facts of GPU instance `gi`: (ID, profile, placement start, size).
fn gpu_instance_info(
    nvml: &Nvml,
    gi: sys::nvmlGpuInstance_t,
) -> Result<(u32, u32, u32, u32), MigError> {
    let info_of = nvml_sym(nvml.lib().nvmlGpuInstanceGetInfo.as_ref())?;
    // SAFETY: an all-zero value is valid for this plain C struct.
    let mut info: sys::nvmlGpuInstanceInfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `gi` is a live handle; `info` is writable.
    nvml_try(unsafe { info_of(gi, &mut info) })?;
    Ok((
        info.id,
        info.profileId,
        info.placement.start,
        info.placement.size,
    ))
}

/// The ID of the first compute instance in `gi`, if it has one.
fn first_compute_instance(
    nvml: &Nvml,
    gi: sys::nvmlGpuInstance_t,
) -> Result<Option<u32>, MigError> {
    let lib = nvml.lib();
    let list = nvml_sym(lib.nvmlGpuInstanceGetComputeInstances.as_ref())?;
    let info_of = nvml_sym(lib.nvmlComputeInstanceGetInfo_v2.as_ref())?;
    for p in 0..sys::NVML_COMPUTE_INSTANCE_PROFILE_COUNT {
        // The list is asked for by profile ID, which the profile's info
        // gives for its index.
        let Some(profile) = compute_profile(nvml, gi, p)? else {
            continue;
        };
        let mut cis: Vec<sys::nvmlComputeInstance_t> = vec![std::ptr::null_mut(); 8];
        let mut count = cis.len() as c_uint;
        // SAFETY: `cis` holds `count` writable entries.
        match nvml_try(unsafe { list(gi, profile.id, cis.as_mut_ptr(), &mut count) }) {
            Ok(()) => {}
            Err(e) if absent(&e) => continue,
            Err(e) => return Err(e.into()),
        }
        if let Some(ci) = cis.into_iter().take(count as usize).next() {
            // SAFETY: an all-zero value is valid for this plain C struct.
            let mut info: sys::nvmlComputeInstanceInfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: `ci` is a handle NVML just listed; `info` is writable.
            nvml_try(unsafe { info_of(ci, &mut info) })?;
            return Ok(Some(info.id));
        }
    }
    Ok(None)
}

/// The GPU instances on `dev` with their compute instances. A GPU instance
/// without a compute instance (made by hand, half-done) is listed with
/// compute instance 0 and no UUID.
pub fn instances(nvml: &Nvml, dev: &Device) -> Result<Vec<Instance>, MigError> {
    let list = nvml_sym(nvml.lib().nvmlDeviceGetGpuInstances.as_ref())?;
    // SAFETY: as in `profiles`.
    let handle = unsafe { dev.handle() };
    let mut out = Vec::new();
    for p in profiles(nvml, dev)? {
        let mut gis: Vec<sys::nvmlGpuInstance_t> = vec![std::ptr::null_mut(); 8];
        let mut count = gis.len() as c_uint;
        // SAFETY: `gis` holds `count` writable entries (a GPU has at most
        // 7 instances of a profile).
        match nvml_try(unsafe { list(handle, p.id, gis.as_mut_ptr(), &mut count) }) {
            Ok(()) => {}
            Err(e) if absent(&e) => continue,
            Err(e) => return Err(e.into()),
        }
        for gi in gis.into_iter().take(count as usize) {
            let (id, profile, start, size) = gpu_instance_info(nvml, gi)?;
            let ci = first_compute_instance(nvml, gi)?;
            let uuid = match ci {
                Some(ci) => mig_uuid(nvml, dev, id, ci).unwrap_or_default(),
                None => String::new(),
            };
            out.push(Instance {
                profile,
                start,
                size,
                gpu_instance: id,
                compute_instance: ci.unwrap_or(0),
                uuid,
            });
        }
    }
    Ok(out)
}

/// Makes a GPU instance of `profile` at placement `start` on `dev`, with one
/// compute instance spanning it. If any step fails, what was made is removed
/// again.
pub fn create(nvml: &Nvml, dev: &Device, profile: u32, start: u32) -> Result<Instance, MigError> {
    let lib = nvml.lib();
    let make_gi = nvml_sym(lib.nvmlDeviceCreateGpuInstanceWithPlacement.as_ref())?;
    let make_ci = nvml_sym(lib.nvmlGpuInstanceCreateComputeInstance.as_ref())?;
    let drop_gi = nvml_sym(lib.nvmlGpuInstanceDestroy.as_ref())?;
    let drop_ci = nvml_sym(lib.nvmlComputeInstanceDestroy.as_ref())?;
    let ci_info = nvml_sym(lib.nvmlComputeInstanceGetInfo_v2.as_ref())?;
    let size = profiles(nvml, dev)?
        .into_iter()
        .find(|p| p.id == profile)
        .and_then(|p| {
            p.placements
                .iter()
                .find(|(s, _)| *s == start)
                .map(|(_, n)| *n)
        })
        .ok_or_else(|| {
            MigError::Unexpected(format!(
                "profile {profile} has no placement starting at memory slice {start}"
            ))
        })?;
    // SAFETY: as in `profiles`.
    let handle = unsafe { dev.handle() };
    let placement = sys::nvmlGpuInstancePlacement_t { start, size };
    let mut gi: sys::nvmlGpuInstance_t = std::ptr::null_mut();
    // SAFETY: `placement` is read, `gi` written, both live for the call.
    nvml_try(unsafe { make_gi(handle, profile, &placement, &mut gi) })?;
    let undo_gi = |e: MigError| -> MigError {
        // SAFETY: `gi` is the instance just made and not yet removed.
        let _ = unsafe { drop_gi(gi) };
        e
    };
    let (gi_id, _, _, _) = gpu_instance_info(nvml, gi).map_err(undo_gi)?;
    let ci_profile = spanning_compute_profile(nvml, gi).map_err(undo_gi)?;
    let mut ci: sys::nvmlComputeInstance_t = std::ptr::null_mut();
    // SAFETY: `gi` is live; `ci` is writable.
    nvml_try(unsafe { make_ci(gi, ci_profile, &mut ci) })
        .map_err(MigError::from)
        .map_err(undo_gi)?;
    let undo_both = |e: MigError| -> MigError {
        // SAFETY: `ci` and `gi` were just made and not yet removed; the
        // compute instance goes first, as NVML requires.
        let _ = unsafe { drop_ci(ci) };
        // SAFETY: as above.
        let _ = unsafe { drop_gi(gi) };
        e
    };
    // SAFETY: an all-zero value is valid for this plain C struct.
    let mut info: sys::nvmlComputeInstanceInfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `ci` is live; `info` is writable.
    nvml_try(unsafe { ci_info(ci, &mut info) })
        .map_err(MigError::from)
        .map_err(undo_both)?;
    let uuid = mig_uuid(nvml, dev, gi_id, info.id).map_err(undo_both)?;
    Ok(Instance {
        profile,
        start,
        size,
        gpu_instance: gi_id,
        compute_instance: info.id,
        uuid,
    })
}

/// Removes compute instance `ci` and GPU instance `gi` from `dev`. An
/// instance already gone counts as removed; one still in use is refused by
/// NVML (`InUse`) and stays.
pub fn destroy(nvml: &Nvml, dev: &Device, gi: u32, ci: u32) -> Result<(), MigError> {
    let lib = nvml.lib();
    let gi_by_id = nvml_sym(lib.nvmlDeviceGetGpuInstanceById.as_ref())?;
    let ci_by_id = nvml_sym(lib.nvmlGpuInstanceGetComputeInstanceById.as_ref())?;
    let drop_gi = nvml_sym(lib.nvmlGpuInstanceDestroy.as_ref())?;
    let drop_ci = nvml_sym(lib.nvmlComputeInstanceDestroy.as_ref())?;
    // SAFETY: as in `profiles`.
    let handle = unsafe { dev.handle() };
    let mut g: sys::nvmlGpuInstance_t = std::ptr::null_mut();
    // SAFETY: `g` is writable.
    match nvml_try(unsafe { gi_by_id(handle, gi, &mut g) }) {
        Ok(()) => {}
        Err(NvmlError::NotFound) | Err(NvmlError::InvalidArg) => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    let mut c: sys::nvmlComputeInstance_t = std::ptr::null_mut();
    // SAFETY: `g` is the live instance just found; `c` is writable.
    match nvml_try(unsafe { ci_by_id(g, ci, &mut c) }) {
        // SAFETY: `c` is the live compute instance just found.
        Ok(()) => nvml_try(unsafe { drop_ci(c) })?,
        Err(NvmlError::NotFound) | Err(NvmlError::InvalidArg) => {}
        Err(e) => return Err(e.into()),
    }
    // SAFETY: `g` is live, and its compute instance is gone.
    nvml_try(unsafe { drop_gi(g) })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_profile_info_version_is_nvmls() {
        // nvml.h: sizeof(nvmlGpuInstanceProfileInfo_v2_t) | (2 << 24); the
        // struct is 12 uints, a u64 and 96 chars: 152 bytes.
        assert_eq!(profile_info_v2_version(), 152 | (2 << 24));
    }

    #[test]
    fn c_strings_end_at_the_first_nul() {
        let mut buf = [0 as c_char; 16];
        for (i, b) in b"MIG 1g.10gb".iter().enumerate() {
            buf[i] = *b as c_char;
        }
        assert_eq!(c_string(&buf), "MIG 1g.10gb");
        assert_eq!(c_string(&[0; 4]), "");
    }
}
