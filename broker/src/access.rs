//! Enforces [`passwords`](crate::passwords), [`owner`](crate::owner), the [`acl`](crate::acl) and
//! [`publishing`](crate::publishing) inside rmqtt, through its hooks: one handler answers CONNECT
//! authentication, publish and subscribe checks.
//!
//! At CONNECT it checks, in order: the login (PBKDF2 off the async runtime, and as much work
//! for an unknown user as for a wrong password); that the client id belongs to the account
//! ([`owner`](crate::owner)); and the Last Will, as if it were published now. rmqtt publishes a
//! will (and its retainer stores it) without asking the publish hook, so a will the account
//! could not publish itself is refused here, with the CONNECT, as Mosquitto does. Anonymous
//! clients are checked too: with access control on, the listener lets nobody in by itself
//! (rmqtt would skip this hook for them) and this handler decides.
//!
//! Refusals are logged with who and what, so an operator can tell a misconfigured node from an
//! attack: a CONNECT gets "bad username or password" or "not authorized" (reason codes 0x86 and
//! 0x87 in MQTT 5, 4 and 5 in 3.1.1); a refused MQTT 5 QoS 1 publish gets a PUBACK with 0x87
//! (3.1.1 has no way to say so: the message is dropped, as Mosquitto does); a refused
//! subscription gets 0x87 (3.1.1: 0x80) in its SUBACK.
//!
//! The rules can be swapped while the broker runs (SIGHUP reloads the files): each check reads
//! the current [`AccessControl`] from the [`Shared`] handle.

use crate::acl::{Acl, Client};
use crate::passwords::{Login, Passwords};
use crate::publishing::{self, Message};
use rmqtt::codec::v5::SubscribeAckReason;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType, Type};
use rmqtt::types::{AuthResult, LastWill, PublishAclResult, SubscribeAclResult};
use std::sync::{Arc, RwLock};

/// Who may connect, and what they may do.
pub struct AccessControl {
    /// `None`: any username is accepted (only with anonymous access on).
    pub passwords: Option<Arc<Passwords>>,
    /// `None`: whoever is connected may do everything.
    pub acl: Option<Acl>,
    /// Whether clients without a username get in (they still face the ACL's anonymous rules
    /// and may not use a client id an account owns).
    pub allow_anonymous: bool,
}

/// The access control in force, replaceable while the broker runs.
pub type Shared = Arc<RwLock<Arc<AccessControl>>>;

/// The access control in force now.
pub fn current(shared: &Shared) -> Arc<AccessControl> {
    // A panic while swapping cannot leave a half-written Arc: the old value is still whole.
    match shared.read() {
        Ok(guard) => guard.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

/// Puts `access` in force for every later check.
pub fn replace(shared: &Shared, access: AccessControl) {
    let access = Arc::new(access);
    match shared.write() {
        Ok(mut guard) => *guard = access,
        Err(poisoned) => *poisoned.into_inner() = access,
    }
}

/// Registers the checks of `access` on the server's hooks.
pub async fn register(scx: &rmqtt::context::ServerContext, access: Shared) {
    let register = scx.extends.hook_mgr().register();
    for typ in [
        Type::ClientAuthenticate,
        Type::MessagePublishCheckAcl,
        Type::ClientSubscribeCheckAcl,
    ] {
        register.add(typ, Box::new(Checks(access.clone()))).await;
    }
    register.start().await;
}

struct Checks(Shared);

/// Who a session is, as the ACL sees it.
fn client_of(session: &rmqtt::session::Session) -> Client<'_> {
    Client {
        username: session.id.username.as_deref(),
        client_id: &session.id.client_id,
    }
}

#[async_trait::async_trait]
impl Handler for Checks {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        match param {
            Parameter::ClientAuthenticate(connect) => {
                let result = authenticate(&current(&self.0), connect).await;
                (false, Some(HookResult::AuthResult(result)))
            }
            Parameter::MessagePublishCheckAcl(session, publish) => {
                let access = current(&self.0);
                let Some(acl) = &access.acl else {
                    return (true, acc);
                };
                let client = client_of(session);
                let message = Message {
                    topic: &publish.topic,
                    retain: publish.retain,
                    payload: &publish.payload,
                };
                let Some(reason) = publishing::check(acl, client, message) else {
                    return (
                        true,
                        Some(HookResult::PublishAclResult(PublishAclResult::allow())),
                    );
                };
                tracing::warn!(client_id = %client.client_id, username = client.username.unwrap_or("-"), topic = %publish.topic, retain = publish.retain, %reason, "publish refused");
                let refused = PublishAclResult::rejected(false, Some(reason.into()));
                (false, Some(HookResult::PublishAclResult(refused)))
            }
            Parameter::ClientSubscribeCheckAcl(session, subscribe) => {
                let access = current(&self.0);
                let Some(acl) = &access.acl else {
                    return (true, acc);
                };
                let client = client_of(session);
                let filter: &str = &subscribe.topic_filter;
                if acl.may_subscribe(client, filter) {
                    let granted = SubscribeAclResult::new_success(subscribe.opts.qos(), None);
                    return (true, Some(HookResult::SubscribeAclResult(granted)));
                }
                tracing::warn!(client_id = %client.client_id, username = client.username.unwrap_or("-"), %filter, "subscription refused by the ACL");
                let refused = SubscribeAclResult::new_failure(SubscribeAckReason::NotAuthorized);
                (false, Some(HookResult::SubscribeAclResult(refused)))
            }
            _ => (true, acc),
        }
    }
}

/// The answer to a CONNECT: its login, its client id, its will.
async fn authenticate(access: &AccessControl, connect: &rmqtt::types::ConnectInfo) -> AuthResult {
    let client_id: &str = connect.client_id();
    let user = connect.username().map(|u| u.to_string());
    let remote = connect
        .id()
        .remote_addr
        .map(|a| a.to_string())
        .unwrap_or_default();
    match (&user, &access.passwords) {
        (None, _) if !access.allow_anonymous => {
            tracing::warn!(%client_id, %remote, "connection refused: no username, and anonymous access is off");
            return AuthResult::NotAuthorized;
        }
        (Some(user), Some(passwords)) => {
            let password = connect.password().map(|p| p.to_vec()).unwrap_or_default();
            let (passwords, name) = (passwords.clone(), user.clone());
            // PBKDF2 takes milliseconds of CPU: keep it off the threads that move messages.
            let outcome = tokio::task::spawn_blocking(move || passwords.check(&name, &password))
                .await
                .unwrap_or(Login::WrongPassword);
            if outcome != Login::Ok {
                tracing::warn!(%client_id, %user, %remote, ?outcome, "connection refused: bad username or password");
                return AuthResult::BadUsernameOrPassword;
            }
        }
        _ => {}
    }
    let is_account = |name: &str| {
        access
            .passwords
            .as_ref()
            .is_some_and(|passwords| passwords.contains(name))
    };
    if let Err(not_yours) = crate::owner::check(user.as_deref(), client_id, is_account) {
        tracing::warn!(%client_id, username = user.as_deref().unwrap_or("-"), %remote, "connection refused: {not_yours}");
        return AuthResult::NotAuthorized;
    }
    if let (Some(acl), Some(will)) = (&access.acl, connect.last_will()) {
        let message = match will {
            LastWill::V3(will) => Message {
                topic: &will.topic,
                retain: will.retain,
                payload: &will.message,
            },
            LastWill::V5(will) => Message {
                topic: &will.topic,
                retain: will.retain,
                payload: &will.message,
            },
        };
        let client = Client {
            username: user.as_deref(),
            client_id,
        };
        if let Some(reason) = publishing::check(acl, client, message) {
            tracing::warn!(%client_id, username = user.as_deref().unwrap_or("-"), %remote, will_topic = %message.topic, will_retain = message.retain, %reason, "connection refused: its Last Will is refused");
            return AuthResult::NotAuthorized;
        }
    }
    AuthResult::Allow(false, None)
}
