//! Enforces [`passwords`](crate::passwords) and the [`acl`](crate::acl) inside rmqtt, through
//! its hooks: one handler answers CONNECT authentication, publish and subscribe checks.
//!
//! Refusals are logged with who and what, so an operator can tell a misconfigured node from an
//! attack: a CONNECT gets "bad username or password" or "not authorized" (reason codes 0x86 and
//! 0x87 in MQTT 5, 4 and 5 in 3.1.1); a refused MQTT 5 QoS 1 publish gets a PUBACK with 0x87
//! (3.1.1 has no way to say so: the message is dropped, as Mosquitto does); a refused
//! subscription gets 0x87 (3.1.1: 0x80) in its SUBACK.

use crate::acl::{Acl, Client};
use crate::passwords::{Login, Passwords};
use rmqtt::codec::v5::SubscribeAckReason;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType, Type};
use rmqtt::types::{AuthResult, PublishAclResult, SubscribeAclResult};
use std::sync::Arc;

/// Who may connect, and what they may do.
pub struct AccessControl {
    /// `None`: any username is accepted (only with anonymous access on).
    pub passwords: Option<Passwords>,
    /// `None`: whoever is connected may do everything.
    pub acl: Option<Acl>,
}

/// Registers the checks of `access` on the server's hooks.
pub async fn register(scx: &rmqtt::context::ServerContext, access: AccessControl) {
    let access = Arc::new(access);
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

struct Checks(Arc<AccessControl>);

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
                let Some(passwords) = &self.0.passwords else {
                    return (true, acc);
                };
                let user = connect.username().map(|u| u.to_string());
                let password = connect.password().cloned().unwrap_or_default();
                let remote = connect
                    .id()
                    .remote_addr
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                let result = match &user {
                    // rmqtt lets username-less clients in itself when anonymous access is on.
                    None => {
                        tracing::warn!(client_id = %connect.client_id(), %remote, "connection refused: no username, and anonymous access is off");
                        AuthResult::NotAuthorized
                    }
                    Some(user) => match passwords.check(user, &password) {
                        Login::Ok => AuthResult::Allow(false, None),
                        outcome => {
                            tracing::warn!(client_id = %connect.client_id(), %user, %remote, ?outcome, "connection refused: bad username or password");
                            AuthResult::BadUsernameOrPassword
                        }
                    },
                };
                (false, Some(HookResult::AuthResult(result)))
            }
            Parameter::MessagePublishCheckAcl(session, publish) => {
                let Some(acl) = &self.0.acl else {
                    return (true, acc);
                };
                let client = client_of(session);
                if acl.may_publish(client, &publish.topic) {
                    return (
                        true,
                        Some(HookResult::PublishAclResult(PublishAclResult::allow())),
                    );
                }
                tracing::warn!(client_id = %client.client_id, username = client.username.unwrap_or("-"), topic = %publish.topic, "publish refused by the ACL");
                let refused = PublishAclResult::rejected(
                    false,
                    Some(format!("not authorized to publish to {}", publish.topic).into()),
                );
                (false, Some(HookResult::PublishAclResult(refused)))
            }
            Parameter::ClientSubscribeCheckAcl(session, subscribe) => {
                let Some(acl) = &self.0.acl else {
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
