//! The camera's controls: brightness, contrast and horizontal flip (with the user class
//! control the control queries list), their `G/S/TRY_EXT_CTRLS` semantics and their
//! control events.

use rustix::time::{clock_gettime, ClockId};
use zerocopy::IntoBytes;

use outboard_protocol::v4l2::*;

use super::{CameraSession, SoftwareCamera};
use crate::media::ioctl::{ExtControls, IoctlResult};
use crate::media::{EventQueue, GuestMemoryMapper, HostMemoryMapper, MediaEvent};

/// A camera control: id, name, type, min, max, step, default.
pub(super) struct Ctrl {
    pub(super) id: u32,
    pub(super) name: &'static str,
    pub(super) type_: u32,
    pub(super) min: i32,
    pub(super) max: i32,
    pub(super) step: i32,
    pub(super) default: i32,
    pub(super) flags: u32,
}

/// The user class control, listed by the control queries but neither readable nor
/// writable.
pub(super) const USER_CLASS: Ctrl = Ctrl {
    id: CID_USER_CLASS,
    name: "User Controls",
    type_: CTRL_TYPE_CTRL_CLASS,
    min: 0,
    max: 0,
    step: 0,
    default: 0,
    flags: CTRL_FLAG_READ_ONLY | CTRL_FLAG_WRITE_ONLY,
};

/// The camera's controls; a session keeps their values in this order.
pub(super) const CTRLS: [Ctrl; 3] = [
    Ctrl {
        id: CID_BRIGHTNESS,
        name: "Brightness",
        type_: CTRL_TYPE_INTEGER,
        min: 0,
        max: 255,
        step: 1,
        default: 128,
        flags: CTRL_FLAG_SLIDER,
    },
    Ctrl {
        id: CID_CONTRAST,
        name: "Contrast",
        type_: CTRL_TYPE_INTEGER,
        min: 0,
        max: 255,
        step: 1,
        default: 128,
        flags: CTRL_FLAG_SLIDER,
    },
    Ctrl {
        id: CID_HFLIP,
        name: "Horizontal Flip",
        type_: CTRL_TYPE_BOOLEAN,
        min: 0,
        max: 1,
        step: 1,
        default: 0,
        flags: 0,
    },
];

/// The index in [`CTRLS`] of control `id`.
pub(super) fn ctrl_index(id: u32) -> Option<usize> {
    CTRLS.iter().position(|c| c.id == id)
}

/// Which of `G`, `S` and `TRY_EXT_CTRLS` is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ExtOp {
    Get,
    Set,
    Try,
}

impl<E: EventQueue, H: HostMemoryMapper, G: GuestMemoryMapper> SoftwareCamera<E, H, G> {
    pub(super) fn send_ctrl_event(&mut self, s: &mut CameraSession<G>, idx: usize, changes: u32) {
        let Some(c) = CTRLS.get(idx) else { return };
        if !s
            .subscriptions
            .iter()
            .any(|sub| sub.type_ == EVENT_CTRL && sub.id == c.id)
        {
            return;
        }
        let mut ev = V4l2Event {
            type_: EVENT_CTRL,
            id: c.id,
            sequence: s.event_sequence,
            ..Default::default()
        };
        s.event_sequence = s.event_sequence.wrapping_add(1);
        let t = clock_gettime(ClockId::Monotonic);
        ev.timestamp = Timespec {
            tv_sec: t.tv_sec,
            tv_nsec: t.tv_nsec,
        };
        // struct v4l2_event_ctrl: changes, type, value (8), flags, min, max, step, default.
        let words: [i32; 10] = [
            changes as i32,
            c.type_ as i32,
            s.ctrls[idx],
            0,
            0,
            c.min,
            c.max,
            c.step,
            c.default,
            0,
        ];
        ev.u[..40].copy_from_slice(words.as_bytes());
        self.events.send_event(MediaEvent::v4l2(s.id, &ev));
    }

    pub(super) fn set_ctrl(&mut self, s: &mut CameraSession<G>, idx: usize, value: i32) {
        let Some(c) = CTRLS.get(idx) else { return };
        let v = value.clamp(c.min, c.max);
        if s.ctrls[idx] != v {
            s.ctrls[idx] = v;
            self.send_ctrl_event(s, idx, EVENT_CTRL_CH_VALUE);
        }
    }

    pub(super) fn ext_ctrls(
        &mut self,
        s: &mut CameraSession<G>,
        ctrls: &mut ExtControls,
        op: ExtOp,
    ) -> IoctlResult<()> {
        let which = ctrls.header.which;
        let by_class = which & 0xffff != 0 || which == CTRL_CLASS_USER;
        let valid_which = which == CTRL_WHICH_CUR_VAL
            || (which == CTRL_WHICH_DEF_VAL && op == ExtOp::Get)
            || (by_class && which & 0xffff == 0 && which < CTRL_WHICH_DEF_VAL);
        if !valid_which {
            ctrls.header.error_idx = ctrls.header.count;
            return Err(libc::EINVAL);
        }
        let mut idxs = Vec::with_capacity(ctrls.controls.len());
        for (i, c) in ctrls.controls.iter().enumerate() {
            if c.id == CID_USER_CLASS {
                // Write-only for G, read-only for S/TRY: the V4L2 core reports this
                // with error_idx == count, except TRY, which names the control.
                ctrls.header.error_idx = if op == ExtOp::Try {
                    i as u32
                } else {
                    ctrls.header.count
                };
                return Err(libc::EACCES);
            }
            match ctrl_index(c.id) {
                Some(idx) if c.size == 0 => idxs.push(idx),
                _ => {
                    ctrls.header.error_idx = if op == ExtOp::Try {
                        i as u32
                    } else {
                        ctrls.header.count
                    };
                    return Err(libc::EINVAL);
                }
            }
        }
        for (c, idx) in ctrls.controls.iter_mut().zip(idxs) {
            let def = &CTRLS[idx];
            match op {
                ExtOp::Get if which == CTRL_WHICH_DEF_VAL => c.set_value(def.default),
                ExtOp::Get => c.set_value(s.ctrls[idx]),
                ExtOp::Try => c.set_value(c.value().clamp(def.min, def.max)),
                ExtOp::Set => {
                    let v = c.value().clamp(def.min, def.max);
                    c.set_value(v);
                    self.set_ctrl(s, idx, v);
                }
            }
        }
        Ok(())
    }
}
