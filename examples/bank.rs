//! A bank transfer with shared globals: balances every worker process sees, moved with an
//! optimistic read-modify-write so that money is never created, lost or overdrawn.
//!
//! Run it with:
//!
//! ```sh
//! cargo run --example bank
//! ```
//!
//! It uses the Redis at `REDIS_URL`; without `REDIS_URL` the one on `127.0.0.1:6379`, and if none
//! answers there and `redis-server` is installed, a private one started for the run. Its variables
//! live under the key prefix `bank-example` and are deleted at the end.
//!
//! Eight tasks stand in for eight worker processes (each could be its own process: nothing is
//! shared but Redis). They make random transfers between three accounts at once; a transfer that
//! would overdraw an account is refused with the bank's own error. At the end the balances still add
//! up, read in one consistent snapshot.

use std::process::ExitCode;

use herd::globals::{Group, UpdateError};
use herd::{Config, Globals, RedisClient};
use rand::Rng as _;

const ACCOUNTS: [&str; 3] = ["alice", "bob", "carol"];

/// The bank's own refusal, returned by `update` as `UpdateError::Aborted`.
#[derive(Debug)]
struct InsufficientFunds {
    account: String,
    balance: i64,
    wanted: i64,
}

/// Moves `amount` from one account to another, atomically against every other worker. Returns the
/// payer's new balance.
async fn transfer(
    bank: &Group,
    from: &str,
    to: &str,
    amount: i64,
) -> Result<i64, UpdateError<InsufficientFunds>> {
    // `update` WATCHes both balances, reads them, runs the closure, and commits with MULTI/EXEC;
    // if another worker changed either balance meanwhile, it runs the closure again on fresh values.
    bank.update(&[from, to], |balances: &mut [Option<i64>]| {
        let payer = balances[0].unwrap_or(0);
        if payer < amount {
            return Err(InsufficientFunds {
                account: from.to_owned(),
                balance: payer,
                wanted: amount,
            });
        }
        balances[0] = Some(payer - amount);
        balances[1] = Some(balances[1].unwrap_or(0) + amount);
        Ok(payer - amount)
    })
    .await
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bank: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    // Kept until the end of `run`: a private redis-server stops when this is dropped.
    let redis_server = herd::testing::LocalRedis::find_or_start("bank")?;
    let config = Config::builder()
        .redis_url(redis_server.url())
        .prefix("bank-example")
        .build()?;
    let redis = RedisClient::connect(config)
        .await
        .map_err(|e| format!("no answer from the Redis at {}: {e}", redis_server.source()))?;
    // Any two transfers between three accounts share an account, so contention is extreme here:
    // allow more optimistic attempts than the default 10.
    let globals = Globals::new(redis).with_max_attempts(25);
    let bank = globals.group("bank")?; // every account shares the hash tag `{bank}`

    // Open the accounts in one atomic group: other workers see all three or none.
    bank.atomic()
        .set("alice", &100_i64)
        .set("bob", &50_i64)
        .set("carol", &0_i64)
        .apply()
        .await?;
    println!("opened: {:?}", bank.get_many::<i64>(&ACCOUNTS).await?);

    // A transfer that would overdraw is refused with the bank's error, and writes nothing.
    match transfer(&bank, "carol", "alice", 500).await {
        Err(UpdateError::Aborted(e)) => println!(
            "refused: {} has {} and cannot pay {}",
            e.account, e.balance, e.wanted
        ),
        other => println!("unexpected: {other:?}"),
    }

    // Eight "workers" make 200 random transfers each, all at once.
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let bank = bank.clone();
            tokio::spawn(async move {
                let (mut done, mut refused, mut busy) = (0, 0, 0);
                for _ in 0..200 {
                    let (from, to, amount) = {
                        let mut rng = rand::rng();
                        let from = rng.random_range(0..ACCOUNTS.len());
                        let to = (from + rng.random_range(1..ACCOUNTS.len())) % ACCOUNTS.len();
                        (ACCOUNTS[from], ACCOUNTS[to], rng.random_range(1..=40))
                    };
                    match transfer(&bank, from, to, amount).await {
                        Ok(_) => done += 1,
                        Err(UpdateError::Aborted(_)) => refused += 1,
                        // Lost the race every time: a web handler would answer 409, try again later.
                        Err(e) if e.is_conflict() => busy += 1,
                        Err(UpdateError::Failed(e)) => return Err(e),
                    }
                }
                Ok::<_, herd::Error>((done, refused, busy))
            })
        })
        .collect();
    let (mut done, mut refused, mut busy) = (0, 0, 0);
    for worker in workers {
        let (d, r, b) = worker.await??;
        done += d;
        refused += r;
        busy += b;
    }

    // One MGET: a consistent snapshot, never half of a transfer.
    let balances = bank.get_many::<i64>(&ACCOUNTS).await?;
    let total: i64 = balances.iter().flatten().sum();
    println!(
        "{done} transfers, {refused} refused for insufficient funds, {busy} gave up after conflicts"
    );
    for (name, balance) in ACCOUNTS.iter().zip(&balances) {
        println!("  {name:>5}: {}", balance.unwrap_or(0));
    }
    println!("  total: {total} (always 150)");
    if total != 150 {
        return Err(format!("the balances add up to {total}, not 150").into());
    }

    // Close the accounts (one atomic group again) so that the next run starts afresh.
    let mut close = bank.atomic();
    for name in ACCOUNTS {
        close = close.delete(name);
    }
    close.apply().await?;
    Ok(())
}
