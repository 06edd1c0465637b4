//! A tunnel's place in the plane's maps and epoll set, and the one way a
//! tunnel that does not move on ends: [`Membership::end`].

use std::os::fd::RawFd;

use super::super::deadlines::Entry;
use super::super::kernel::Kernel;
use crate::dataplane::{abort, CloseReason};

/// Takes the tunnel's sockets out of every map and the events thread's
/// epoll set, and its idle deadline out of the plane's, when dropped,
/// whatever ended the tunnel (also a cancelled relay future).
pub(super) struct Membership<'k> {
    pub kernel: &'k Kernel,
    /// Client, backend.
    pub cookies: [u64; 2],
    /// Client, backend.
    pub fds: [RawFd; 2],
    /// The sockets are registered with the events thread.
    pub registered: bool,
    /// The sockets are closed right after: closing takes them out of the
    /// socket maps and the epoll set by itself (four map deletions and two
    /// epoll_ctl calls fewer per tunnel).
    pub closing: bool,
    /// Already out of everything ([`Membership::leave`]).
    left: bool,
    /// The idle deadline the watch set
    /// ([`super::super::deadlines::Deadlines`]).
    pub deadline: Entry,
}

impl<'k> Membership<'k> {
    /// A tunnel about to join the maps: nothing is joined yet.
    pub fn new(kernel: &'k Kernel, cookies: [u64; 2], fds: [RawFd; 2]) -> Membership<'k> {
        Membership { kernel, cookies, fds, registered: false, closing: false, left: false, deadline: 0 }
    }
}

impl Membership<'_> {
    /// Out of every map and the epoll set now (the sockets live on, for
    /// another plane); nothing is left for `drop`.
    pub fn leave(&mut self) {
        self.kernel.deadlines.clear(self.cookies[0], &mut self.deadline);
        for c in self.cookies {
            self.kernel.deactivate(c);
        }
        self.kernel.unpair(self.cookies);
        for c in self.cookies {
            self.kernel.remove_target(c);
        }
        if std::mem::take(&mut self.registered) {
            self.kernel.unregister(self.cookies, self.fds);
        }
        self.left = true;
    }

    /// The tunnel ends here, for `reason`: out of the maps (if still in
    /// them), and its sockets set to reset rather than FIN when the reason
    /// says so ([`reset_if`]). Their owner closes them after this.
    pub fn end(self, reason: CloseReason) {
        let fds = self.fds;
        drop(self);
        reset_if(reason, fds);
    }
}

impl Drop for Membership<'_> {
    fn drop(&mut self) {
        self.kernel.deadlines.clear(self.cookies[0], &mut self.deadline);
        if self.left {
            return;
        }
        if !self.closing {
            for c in self.cookies {
                self.kernel.deactivate(c);
            }
        }
        self.kernel.unpair(self.cookies);
        if !self.closing {
            for c in self.cookies {
                self.kernel.remove_target(c);
            }
        }
        if self.registered {
            if self.closing {
                self.kernel.forget(self.cookies);
            } else {
                self.kernel.unregister(self.cookies, self.fds);
            }
        }
    }
}

/// A reset, a stream that can no longer be relayed exactly, or one the
/// drain deadline cut: a FIN would tell the peers everything arrived, so
/// both sockets (client, backend) will close with RST.
pub(super) fn reset_if(reason: CloseReason, fds: [RawFd; 2]) {
    if reason.resets() {
        abort(fds[0]);
        abort(fds[1]);
    }
}
