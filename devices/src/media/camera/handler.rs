//! The camera's answers to the V4L2 ioctls ([`IoctlHandler`]).

use outboard_protocol::v4l2::*;

use super::buffers::{add_buffers, Backing};
use super::controls::{ctrl_index, ExtOp, CTRLS, USER_CLASS};
use super::formats::{plane_sizes, INTERVALS, SIZES};
use super::{CameraSession, SoftwareCamera};
use crate::media::ioctl::{BufferDesc, ExtControls, GuestBuffer, IoctlHandler, IoctlResult};
use crate::media::{
    EventQueue, GuestMemoryMapper, GuestMemoryRange, HostMemoryMapper, MediaMetrics,
};

impl<E: EventQueue, H: HostMemoryMapper, G: GuestMemoryMapper> IoctlHandler
    for SoftwareCamera<E, H, G>
{
    type Session = CameraSession<G>;

    fn metrics(&self) -> Option<&MediaMetrics> {
        Some(&self.metrics)
    }

    fn enum_fmt(&mut self, _: &mut Self::Session, d: V4l2Fmtdesc) -> IoctlResult<V4l2Fmtdesc> {
        if d.type_ != self.buf_type() {
            return Err(libc::EINVAL);
        }
        let (fourcc, desc) = self.formats().get(d.index as usize).ok_or(libc::EINVAL)?;
        let mut out = V4l2Fmtdesc {
            index: d.index,
            type_: d.type_,
            pixelformat: *fourcc,
            ..Default::default()
        };
        set_name(&mut out.description, desc);
        Ok(out)
    }

    #[inline]
    fn g_fmt(&mut self, _: &mut Self::Session, buf_type: u32) -> IoctlResult<V4l2Format> {
        if buf_type != self.buf_type() {
            return Err(libc::EINVAL);
        }
        Ok(self.current().format)
    }

    #[inline]
    fn try_fmt(&mut self, _: &mut Self::Session, f: V4l2Format) -> IoctlResult<V4l2Format> {
        let i = self.snap_format(&f)?;
        self.table.get(i).map(|e| e.format).ok_or(libc::EINVAL)
    }

    #[inline]
    fn s_fmt(&mut self, s: &mut Self::Session, f: V4l2Format) -> IoctlResult<V4l2Format> {
        let i = self.snap_format(&f)?;
        if !self.busy.is_empty() || s.streaming {
            return Err(libc::EBUSY);
        }
        let format = self.table.get(i).ok_or(libc::EINVAL)?.format;
        self.current = i;
        Ok(format)
    }

    fn reqbufs(
        &mut self,
        s: &mut Self::Session,
        req: V4l2Requestbuffers,
    ) -> IoctlResult<V4l2Requestbuffers> {
        if req.type_ != self.buf_type() || !matches!(req.memory, MEMORY_MMAP | MEMORY_USERPTR) {
            return Err(libc::EINVAL);
        }
        if s.streaming || self.session_mapped(s.id) || self.busy_elsewhere(s.id) {
            return Err(libc::EBUSY);
        }
        self.free_buffers(s);
        s.pix = self.pix();
        let count = add_buffers(
            s,
            &self.metrics,
            req.memory,
            req.count,
            &plane_sizes(&s.pix),
        )?;
        s.memory = if count > 0 { req.memory } else { 0 };
        if count > 0 {
            self.busy.insert(s.id);
        }
        Ok(V4l2Requestbuffers {
            count,
            type_: req.type_,
            memory: req.memory,
            capabilities: BUF_CAP_SUPPORTS_MMAP | BUF_CAP_SUPPORTS_USERPTR,
            ..Default::default()
        })
    }

    fn create_bufs(
        &mut self,
        s: &mut Self::Session,
        c: V4l2CreateBuffers,
    ) -> IoctlResult<V4l2CreateBuffers> {
        if c.format.type_ != self.buf_type()
            || !matches!(c.memory, MEMORY_MMAP | MEMORY_USERPTR)
            || (!s.buffers.is_empty() && c.memory != s.memory)
        {
            return Err(libc::EINVAL);
        }
        if self.busy_elsewhere(s.id) {
            return Err(libc::EBUSY);
        }
        // Buffers may be larger than the current format needs, never smaller.
        let need = plane_sizes(&self.pix());
        let want: Vec<u32> = if self.mplane {
            let mp = c.format.pix_mp();
            if usize::from(mp.num_planes) != need.len() {
                return Err(libc::EINVAL);
            }
            mp.plane_fmt
                .iter()
                .take(need.len())
                .map(|p| p.sizeimage)
                .collect()
        } else {
            vec![c.format.pix().sizeimage]
        };
        if want.iter().zip(&need).any(|(w, n)| w < n) {
            return Err(libc::EINVAL);
        }
        if s.buffers.is_empty() {
            s.pix = self.pix();
        }
        let index = s.buffers.len() as u32;
        let count = add_buffers(s, &self.metrics, c.memory, c.count, &want)?;
        if !s.buffers.is_empty() {
            s.memory = c.memory;
            self.busy.insert(s.id);
        }
        Ok(V4l2CreateBuffers {
            index,
            count,
            capabilities: BUF_CAP_SUPPORTS_MMAP | BUF_CAP_SUPPORTS_USERPTR,
            // No cache hints (so no V4L2_MEMORY_FLAG_NON_COHERENT); reserved words are
            // zero.
            flags: 0,
            reserved: [0; 6],
            ..c
        })
    }

    fn querybuf(
        &mut self,
        s: &mut Self::Session,
        buf_type: u32,
        index: u32,
    ) -> IoctlResult<BufferDesc> {
        if buf_type != self.buf_type() {
            return Err(libc::EINVAL);
        }
        let mut desc = s.describe(index).ok_or(libc::EINVAL)?;
        if self.mappings.is_mapped(s.id, index) {
            desc.buffer.flags |= BUF_FLAG_MAPPED;
        }
        Ok(desc)
    }

    fn qbuf(&mut self, s: &mut Self::Session, gb: GuestBuffer) -> IoctlResult<BufferDesc> {
        let b = gb.desc.buffer;
        if b.type_ != self.buf_type() || b.memory != s.memory || s.memory == 0 {
            return Err(libc::EINVAL);
        }
        let need = plane_sizes(&s.pix);
        let buf = s.buffers.get_mut(b.index as usize).ok_or(libc::EINVAL)?;
        if buf.queued {
            return Err(libc::EINVAL);
        }
        // What the guest gives for each plane: its user pointer and length.
        let given: Vec<(u64, u32)> = if self.mplane {
            gb.desc.planes.iter().map(|p| (p.m, p.length)).collect()
        } else {
            vec![(b.m, b.length)]
        };
        if given.len() != buf.planes.len() {
            return Err(libc::EINVAL);
        }
        if b.memory == MEMORY_USERPTR {
            if given.iter().zip(&need).any(|((_, len), n)| len < n)
                || gb.userptr.len() != given.len()
            {
                return Err(libc::EINVAL);
            }
            // Check the lists now (EFAULT for memory outside the guest's), map them
            // again when the frame is written.
            for ((sgs, n), (_, len)) in gb.userptr.iter().zip(&need).zip(&given) {
                let m = self.guest.new_mapping(sgs)?;
                if m.len() < *n as usize || m.len() < *len as usize {
                    return Err(libc::EINVAL);
                }
            }
            for ((p, sgs), (ptr, len)) in buf.planes.iter_mut().zip(&gb.userptr).zip(&given) {
                if let Backing::UserPtr {
                    sgs: queued_sgs,
                    userptr,
                    length,
                } = &mut p.backing
                {
                    *queued_sgs = sgs.clone();
                    *userptr = *ptr;
                    *length = *len;
                }
            }
        }
        buf.queued = true;
        buf.flags = 0;
        s.queue.push_back(b.index);
        let mut desc = s.describe(b.index).ok_or(libc::EINVAL)?;
        if self.mappings.is_mapped(s.id, b.index) {
            desc.buffer.flags |= BUF_FLAG_MAPPED;
        }
        Ok(desc)
    }

    fn streamon(&mut self, s: &mut Self::Session, buf_type: u32) -> IoctlResult<()> {
        if buf_type != self.buf_type() || s.buffers.is_empty() {
            return Err(libc::EINVAL);
        }
        if !s.streaming {
            s.sequence = 0;
            s.interval = self.interval;
            s.arm_timer(true)?;
            s.streaming = true;
        }
        Ok(())
    }

    fn streamoff(&mut self, s: &mut Self::Session, buf_type: u32) -> IoctlResult<()> {
        if buf_type != self.buf_type() {
            return Err(libc::EINVAL);
        }
        s.arm_timer(false)?;
        s.streaming = false;
        // Every queued buffer returns to the driver without being filled.
        for index in std::mem::take(&mut s.queue) {
            if let Some(b) = s.buffers.get_mut(index as usize) {
                b.queued = false;
            }
        }
        Ok(())
    }

    fn g_parm(&mut self, _: &mut Self::Session, buf_type: u32) -> IoctlResult<V4l2Streamparm> {
        if buf_type != self.buf_type() {
            return Err(libc::EINVAL);
        }
        let mut p = V4l2Streamparm {
            type_: buf_type,
            ..Default::default()
        };
        p.set_capture(&V4l2Captureparm {
            capability: CAP_TIMEPERFRAME,
            timeperframe: V4l2Fract {
                numerator: self.interval.0,
                denominator: self.interval.1,
            },
            ..Default::default()
        });
        Ok(p)
    }

    fn s_parm(&mut self, s: &mut Self::Session, p: V4l2Streamparm) -> IoctlResult<V4l2Streamparm> {
        if p.type_ != self.buf_type() {
            return Err(libc::EINVAL);
        }
        let t = p.capture().timeperframe;
        if t.numerator != 0 && t.denominator != 0 {
            // Nearest supported interval, compared in microseconds.
            let want = u64::from(t.numerator) * 1_000_000 / u64::from(t.denominator);
            if let Some(best) = INTERVALS
                .iter()
                .copied()
                .min_by_key(|(n, d)| (u64::from(*n) * 1_000_000 / u64::from(*d)).abs_diff(want))
            {
                self.interval = best;
                s.interval = best;
            }
            if s.streaming {
                s.arm_timer(true)?;
            }
        }
        self.g_parm(s, p.type_)
    }

    fn enuminput(&mut self, _: &mut Self::Session, index: u32) -> IoctlResult<V4l2Input> {
        if index != 0 {
            return Err(libc::EINVAL);
        }
        let mut i = V4l2Input {
            index,
            type_: INPUT_TYPE_CAMERA,
            ..Default::default()
        };
        set_name(&mut i.name, "Camera");
        Ok(i)
    }

    fn g_input(&mut self, _: &mut Self::Session) -> IoctlResult<i32> {
        Ok(0)
    }

    fn s_input(&mut self, _: &mut Self::Session, input: i32) -> IoctlResult<i32> {
        if input == 0 {
            Ok(0)
        } else {
            Err(libc::EINVAL)
        }
    }

    fn g_ctrl(&mut self, s: &mut Self::Session, id: u32) -> IoctlResult<V4l2Control> {
        if id == CID_USER_CLASS {
            return Err(libc::EACCES);
        }
        let idx = ctrl_index(id).ok_or(libc::EINVAL)?;
        Ok(V4l2Control {
            id,
            value: s.ctrls[idx],
        })
    }

    fn s_ctrl(&mut self, s: &mut Self::Session, c: V4l2Control) -> IoctlResult<V4l2Control> {
        if c.id == CID_USER_CLASS {
            return Err(libc::EACCES);
        }
        let idx = ctrl_index(c.id).ok_or(libc::EINVAL)?;
        self.set_ctrl(s, idx, c.value);
        Ok(V4l2Control {
            id: c.id,
            value: s.ctrls[idx],
        })
    }

    fn queryctrl(&mut self, _: &mut Self::Session, q: V4l2Queryctrl) -> IoctlResult<V4l2Queryctrl> {
        let next = q.id & (CTRL_FLAG_NEXT_CTRL | CTRL_FLAG_NEXT_COMPOUND) != 0;
        let id = q.id & !(CTRL_FLAG_NEXT_CTRL | CTRL_FLAG_NEXT_COMPOUND);
        let c = if next {
            if q.id & CTRL_FLAG_NEXT_CTRL == 0 {
                // Only compound controls requested; the camera has none.
                return Err(libc::EINVAL);
            }
            std::iter::once(&USER_CLASS)
                .chain(CTRLS.iter())
                .filter(|c| c.id > id)
                .min_by_key(|c| c.id)
        } else {
            std::iter::once(&USER_CLASS)
                .chain(CTRLS.iter())
                .find(|c| c.id == id)
        }
        .ok_or(libc::EINVAL)?;
        let mut out = V4l2Queryctrl {
            id: c.id,
            type_: c.type_,
            minimum: c.min,
            maximum: c.max,
            step: c.step,
            default_value: c.default,
            flags: c.flags,
            ..Default::default()
        };
        set_name(&mut out.name, c.name);
        Ok(out)
    }

    fn query_ext_ctrl(
        &mut self,
        s: &mut Self::Session,
        q: V4l2QueryExtCtrl,
    ) -> IoctlResult<V4l2QueryExtCtrl> {
        let base = self.queryctrl(
            s,
            V4l2Queryctrl {
                id: q.id,
                ..Default::default()
            },
        )?;
        Ok(V4l2QueryExtCtrl {
            id: base.id,
            type_: base.type_,
            name: base.name,
            minimum: base.minimum.into(),
            maximum: base.maximum.into(),
            step: base.step as u64,
            default_value: base.default_value.into(),
            flags: base.flags,
            elem_size: if base.type_ == CTRL_TYPE_CTRL_CLASS {
                0
            } else {
                4
            },
            elems: 1,
            ..Default::default()
        })
    }

    fn g_ext_ctrls(&mut self, s: &mut Self::Session, c: &mut ExtControls) -> IoctlResult<()> {
        self.ext_ctrls(s, c, ExtOp::Get)
    }

    fn s_ext_ctrls(&mut self, s: &mut Self::Session, c: &mut ExtControls) -> IoctlResult<()> {
        self.ext_ctrls(s, c, ExtOp::Set)
    }

    fn try_ext_ctrls(&mut self, s: &mut Self::Session, c: &mut ExtControls) -> IoctlResult<()> {
        self.ext_ctrls(s, c, ExtOp::Try)
    }

    fn enum_framesizes(
        &mut self,
        _: &mut Self::Session,
        q: V4l2Frmsizeenum,
    ) -> IoctlResult<V4l2Frmsizeenum> {
        if !self.formats().iter().any(|(c, _)| *c == q.pixel_format) {
            return Err(libc::EINVAL);
        }
        let (w, h) = SIZES.get(q.index as usize).ok_or(libc::EINVAL)?;
        Ok(V4l2Frmsizeenum {
            index: q.index,
            pixel_format: q.pixel_format,
            type_: FRMSIZE_TYPE_DISCRETE,
            size: [*w, *h, 0, 0, 0, 0],
            ..Default::default()
        })
    }

    fn enum_frameintervals(
        &mut self,
        _: &mut Self::Session,
        q: V4l2Frmivalenum,
    ) -> IoctlResult<V4l2Frmivalenum> {
        if !self.formats().iter().any(|(c, _)| *c == q.pixel_format)
            || !SIZES.contains(&(q.width, q.height))
        {
            return Err(libc::EINVAL);
        }
        let (n, d) = INTERVALS.get(q.index as usize).ok_or(libc::EINVAL)?;
        Ok(V4l2Frmivalenum {
            index: q.index,
            pixel_format: q.pixel_format,
            width: q.width,
            height: q.height,
            type_: FRMIVAL_TYPE_DISCRETE,
            interval: [*n, *d, 0, 0, 0, 0],
            ..Default::default()
        })
    }

    fn subscribe_event(
        &mut self,
        s: &mut Self::Session,
        sub: V4l2EventSubscription,
    ) -> IoctlResult<()> {
        if sub.type_ != EVENT_CTRL {
            return Err(libc::EINVAL);
        }
        // The class control can be subscribed to; it never changes, so it has no events.
        let idx = ctrl_index(sub.id);
        if idx.is_none() && sub.id != CID_USER_CLASS {
            return Err(libc::EINVAL);
        }
        if sub.flags & !(EVENT_SUB_FL_SEND_INITIAL | EVENT_SUB_FL_ALLOW_FEEDBACK) != 0 {
            return Err(libc::EINVAL);
        }
        if !s
            .subscriptions
            .iter()
            .any(|x| x.type_ == sub.type_ && x.id == sub.id)
        {
            s.subscriptions.push(sub);
        }
        if let (Some(idx), true) = (idx, sub.flags & EVENT_SUB_FL_SEND_INITIAL != 0) {
            self.send_ctrl_event(s, idx, EVENT_CTRL_CH_VALUE | EVENT_CTRL_CH_FLAGS);
        }
        Ok(())
    }

    fn unsubscribe_event(
        &mut self,
        s: &mut Self::Session,
        sub: V4l2EventSubscription,
    ) -> IoctlResult<()> {
        if sub.type_ == EVENT_ALL {
            s.subscriptions.clear();
        } else {
            s.subscriptions
                .retain(|x| !(x.type_ == sub.type_ && x.id == sub.id));
        }
        Ok(())
    }
}
