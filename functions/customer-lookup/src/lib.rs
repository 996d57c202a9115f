//! `customer-lookup`: answers "who is calling?" for routing.
//!
//! Trigger: request-reply on `cc.v1.customers.lookup`. The runtime sends this function's
//! outputs as the reply, so it returns exactly one event: subject
//! `cc.v1.customers.lookup.reply` (fixed, so a direct `patchbay fn invoke` gets the same
//! answer as a request on the trigger), type `cc.customer.found.v1`, JSON data. Publish
//! allow-list: `cc.v1.customers.lookup.reply`.
//!
//! * type `cc.customer.lookup.v1` (or any other type): data `{ "phone": "+44 20 7946 0000" }`
//!   → `{ "customer_id", "tier", "name", "language", "known": true }` from the kv entry
//!   `phone-<digits>`; an unknown number is not an error but a default reply
//!   `{ "customer_id": null, "tier": <config default_tier, "standard">, "name": null,
//!   "language": <config default_language, "en">, "known": false }`.
//! * type `cc.customer.upsert.v1`: data `{ "phone", "customer_id", "tier", "name",
//!   "language" }` stores the customer (how a demo or an admin seeds the bucket) and
//!   replies with the stored record.
//!
//! A request without a usable phone number (malformed JSON, no digits) fails with
//! dead-letter, which the requester receives as the error reply.
//!
//! Payload types are local serde structs until `services/protocol` offers them.

use patchbay_sdk::prelude::*;
use serde::{Deserialize, Serialize};

/// Event type that stores a customer instead of looking one up.
const UPSERT_TYPE: &str = "cc.customer.upsert.v1";

#[derive(Debug, Deserialize)]
struct Lookup {
    phone: String,
}

/// A customer as kept in kv under `phone-<digits>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Customer {
    customer_id: String,
    tier: String,
    name: String,
    language: String,
}

#[derive(Debug, Deserialize)]
struct Upsert {
    phone: String,
    #[serde(flatten)]
    customer: Customer,
}

/// Where replies are addressed (they travel as the reply to the request, not published).
const REPLY_SUBJECT: &str = "cc.v1.customers.lookup.reply";

/// The reply: a known customer or the defaults for an unknown caller.
#[derive(Debug, PartialEq, Serialize)]
struct Reply {
    customer_id: Option<String>,
    tier: String,
    name: Option<String>,
    language: String,
    known: bool,
}

impl Reply {
    fn known(c: Customer) -> Self {
        Self {
            customer_id: Some(c.customer_id),
            tier: c.tier,
            name: Some(c.name),
            language: c.language,
            known: true,
        }
    }

    fn unknown(default_tier: String, default_language: String) -> Self {
        Self {
            customer_id: None,
            tier: default_tier,
            name: None,
            language: default_language,
            known: false,
        }
    }
}

/// The kv key for a phone number: its digits only, so `+44 20 7946-0000` and
/// `00442079460000`'s common form `442079460000` agree; a number without digits is no key.
fn phone_key(phone: &str) -> Result<String, Failure> {
    let digits: String = phone.chars().filter(char::is_ascii_digit).collect();
    if digits.is_empty() {
        return Err(Failure::dead_letter(format!(
            "phone number {phone:?} has no digits"
        )));
    }
    Ok(format!("phone-{digits}"))
}

fn reply(e: &Event, body: &impl Serialize) -> Result<Vec<Event>, Failure> {
    let subject = REPLY_SUBJECT;
    Ok(vec![
        Event::new(subject, "cc.customer.found.v1")
            .follows(e)
            .with_json(body)?,
    ])
}

struct CustomerLookup;

impl Handler for CustomerLookup {
    fn handle(e: Event) -> Result<Vec<Event>, Failure> {
        if e.type_ == UPSERT_TYPE {
            let upsert: Upsert = e.json()?;
            let key = phone_key(&upsert.phone)?;
            kv::set_json(&key, &upsert.customer)?;
            info!("stored customer {} as {key}", upsert.customer.customer_id);
            return reply(&e, &Reply::known(upsert.customer));
        }
        let lookup: Lookup = e.json()?;
        let key = phone_key(&lookup.phone)?;
        let answer = match kv::get_json::<Customer>(&key)? {
            Some(customer) => Reply::known(customer),
            None => {
                debug!("no customer for {key}: default reply");
                Reply::unknown(
                    config::get_or("default_tier", "standard"),
                    config::get_or("default_language", "en"),
                )
            }
        };
        reply(&e, &answer)
    }
}

patchbay_sdk::export!(CustomerLookup);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn phone_keys_keep_only_digits() {
        assert_eq!(phone_key("+44 20 7946-0000").unwrap(), "phone-442079460000");
    }

    #[test]
    fn phone_without_digits_is_dead_lettered() {
        assert!(matches!(phone_key("unknown"), Err(Failure::DeadLetter(_))));
    }

    #[test]
    fn unknown_callers_get_the_default_tier_not_an_error() {
        let r = Reply::unknown("standard".into(), "en".into());
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["known"], false);
        assert_eq!(json["tier"], "standard");
        assert!(json["customer_id"].is_null());
    }

    #[test]
    fn replies_on_the_fixed_reply_subject() {
        let e = Event::new("cc.v1.customers.lookup", "cc.customer.lookup.v1").with_id("q-1");
        let out = reply(&e, &Reply::unknown("gold".into(), "fr".into())).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].subject, "cc.v1.customers.lookup.reply");
        assert_eq!(out[0].json::<serde_json::Value>().unwrap()["tier"], "gold");
    }

    #[test]
    fn upserts_carry_the_customer_fields_flat() {
        let e = Event::new("cc.v1.customers.lookup", UPSERT_TYPE).with_data(
            br#"{"phone":"+44 1","customer_id":"cu-1","tier":"gold","name":"Ada","language":"en"}"#
                .to_vec(),
            "application/json",
        );
        let upsert: Upsert = e.json().unwrap();
        assert_eq!(upsert.customer.tier, "gold");
    }
}
