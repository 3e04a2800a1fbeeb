//! Lambda entry point of the prune function (see the crate docs).

use lambda_runtime::{service_fn, Error, LambdaEvent};
use serde_json::Value;
use tidemark_prune::{handle, Deps};

#[tokio::main]
async fn main() -> Result<(), Error> {
    tidemark_lambda::init_tracing();
    let deps = Deps::from_env().await?;
    lambda_runtime::run(service_fn(|event: LambdaEvent<Value>| handle(event, &deps))).await
}
