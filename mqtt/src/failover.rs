//! Moving between the members of a broker cluster, as a state machine with no I/O.
//!
//! `--broker mqtt://a:1883,mqtt://b:1883,...` names the members of one clustered broker (or
//! brokers bridged into one mesh). A client stays with the member it reached while that member
//! keeps accepting it: a connection that was up and dropped is first tried again on the same
//! member, since a blip or a quick restart is the common case and moving costs the session where
//! the brokers do not share it. A member that cannot be reached (refused, reset, timed out) or
//! that refuses the CONNECT is left for the next one at once, without the pause between tries,
//! so losing a member costs one failed connect, not a pause per member. Only after every member
//! failed in a row does the client pause before going round again.
//!
//! [`Rotation`] decides; [`crate::link`] carries it out on the rumqttc event loop (whose options
//! are read afresh at every connect).

use std::time::Duration;

/// What ended the last poll, as the rotation needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The broker refused the CONNECT (a login, a server not ready).
    Refused,
    /// Anything else: no TCP connection, a timeout, a connection lost.
    Lost,
}

/// What to do before the next poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Next {
    /// The member to connect to.
    pub member: usize,
    /// How long to wait first.
    pub pause: Duration,
    /// Whether that is another member than the one before.
    pub moved: bool,
}

/// Which member to connect to next, and when.
#[derive(Debug, Clone)]
pub struct Rotation {
    members: usize,
    current: usize,
    /// The current member accepted a CONNECT since its last failure.
    connected: bool,
    /// Members that failed to connect in a row, the current one included.
    failed_in_a_row: usize,
    pause_after_error: Duration,
    pause_after_refusal: Duration,
}

impl Rotation {
    /// A rotation over `members` members (at least one), starting with the first.
    pub fn new(members: usize, pause_after_error: Duration, pause_after_refusal: Duration) -> Self {
        Rotation {
            members: members.max(1),
            current: 0,
            connected: false,
            failed_in_a_row: 0,
            pause_after_error,
            pause_after_refusal,
        }
    }

    /// The member connected to, or being connected to.
    pub fn current(&self) -> usize {
        self.current
    }

    /// The current member accepted the CONNECT.
    pub fn connected(&mut self) {
        self.connected = true;
        self.failed_in_a_row = 0;
    }

    /// The last poll failed: where and when to connect next.
    pub fn failed(&mut self, failure: Failure) -> Next {
        let pause = match failure {
            Failure::Refused => self.pause_after_refusal,
            Failure::Lost => self.pause_after_error,
        };
        if std::mem::take(&mut self.connected) && failure == Failure::Lost {
            // It was up: try it again first, after the usual pause.
            return Next {
                member: self.current,
                pause,
                moved: false,
            };
        }
        self.failed_in_a_row += 1;
        if self.members == 1 {
            return Next {
                member: 0,
                pause,
                moved: false,
            };
        }
        self.current = (self.current + 1) % self.members;
        // Round every member without waiting; pause once all of them failed in a row.
        let pause = if self.failed_in_a_row >= self.members {
            self.failed_in_a_row = 0;
            pause
        } else {
            Duration::ZERO
        };
        Next {
            member: self.current,
            pause,
            moved: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ERROR: Duration = Duration::from_secs(1);
    const REFUSAL: Duration = Duration::from_secs(5);

    fn next(member: usize, pause: Duration, moved: bool) -> Next {
        Next {
            member,
            pause,
            moved,
        }
    }

    #[test]
    fn one_broker_is_tried_again_after_the_pause_as_before() {
        let mut rotation = Rotation::new(1, ERROR, REFUSAL);
        assert_eq!(rotation.failed(Failure::Lost), next(0, ERROR, false));
        assert_eq!(rotation.failed(Failure::Refused), next(0, REFUSAL, false));
        rotation.connected();
        assert_eq!(rotation.failed(Failure::Lost), next(0, ERROR, false));
    }

    #[test]
    fn a_lost_connection_is_tried_again_on_its_member_then_the_next_member_at_once() {
        let mut rotation = Rotation::new(3, ERROR, REFUSAL);
        rotation.connected();
        // Member 0 was up and dropped: once more on it.
        assert_eq!(rotation.failed(Failure::Lost), next(0, ERROR, false));
        // It cannot be reached: member 1 without waiting.
        assert_eq!(
            rotation.failed(Failure::Lost),
            next(1, Duration::ZERO, true)
        );
        rotation.connected();
        assert_eq!(rotation.current(), 1);
        // Member 1 goes too: again on it, then member 2.
        assert_eq!(rotation.failed(Failure::Lost), next(1, ERROR, false));
        assert_eq!(
            rotation.failed(Failure::Lost),
            next(2, Duration::ZERO, true)
        );
    }

    #[test]
    fn with_every_member_down_the_rounds_pause_once_each() {
        let mut rotation = Rotation::new(3, ERROR, REFUSAL);
        // Never connected: the first failure moves on.
        assert_eq!(
            rotation.failed(Failure::Lost),
            next(1, Duration::ZERO, true)
        );
        assert_eq!(
            rotation.failed(Failure::Lost),
            next(2, Duration::ZERO, true)
        );
        assert_eq!(rotation.failed(Failure::Lost), next(0, ERROR, true));
        assert_eq!(
            rotation.failed(Failure::Lost),
            next(1, Duration::ZERO, true)
        );
        assert_eq!(
            rotation.failed(Failure::Lost),
            next(2, Duration::ZERO, true)
        );
        assert_eq!(rotation.failed(Failure::Refused), next(0, REFUSAL, true));
    }

    #[test]
    fn a_member_that_refuses_the_connect_is_left_even_right_after_it_was_up() {
        let mut rotation = Rotation::new(2, ERROR, REFUSAL);
        rotation.connected();
        assert_eq!(
            rotation.failed(Failure::Refused),
            next(1, Duration::ZERO, true)
        );
        // Both refuse: a refusal's pause before the next round.
        assert_eq!(rotation.failed(Failure::Refused), next(0, REFUSAL, true));
    }
}
