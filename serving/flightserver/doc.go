// Package flightserver is Kiln's Arrow Flight service: it stores datasets sent
// with DoPut, serves them back with ListFlights, GetFlightInfo and DoGet,
// runs streaming batch inference with DoExchange through the same model
// manager and dynamic batcher as the KServe gRPC service, and starts and
// tracks training jobs with DoAction. It listens on :8815 by default,
// started alone or next to the gRPC service in `kiln serve`:
//
//	srv, err := flightserver.New(flightserver.Options{
//		DataDir: "data",
//		Models:  flightserver.ManagerModels(servingServer.Manager()),
//	})
//	if err != nil { ... }
//	if err := srv.Start(ctx); err != nil { ... }
//	...
//	err = srv.Shutdown(ctx)
//
// # Datasets
//
// DoPut with the path descriptor ["datasets", NAME] stores the stream as the
// Arrow IPC file DATA_DIR/NAME.arrow (see ValidDatasetName for the names
// allowed). Every record batch is written and fsync'd before the PutResult
// that acknowledges it; a PutResult's app_metadata is the JSON PutProgress
// of every batch durable so far (acknowledgements that the client has not
// read yet are merged), and the last one, sent once the dataset is visible,
// has "committed": true. The stream is written to a temporary file renamed
// over NAME.arrow only once it has ended well: a stream that breaks (the
// client goes away, a malformed IPC message, a second schema) leaves the
// data directory as it was and fails with CANCELLED or INVALID_ARGUMENT.
// Every batch is validated in full before it is written (buffer sizes,
// offsets, null counts recounted from the validity bitmaps, dictionary
// indices, children and dictionaries: arrow-go's array.ValidateFull); a
// batch that fails is INVALID_ARGUMENT naming its column, and the whole
// stream is dropped with it, the batches before it too, although they were
// acknowledged as durable: only "committed" makes a dataset.
// Fsyncs run beside the writing: while the device flushes, the next batches
// are received, checked and written, and one fsync may make several batches
// durable (each acknowledged only after an fsync that began once it was
// written). A batch's body is copied once, from gRPC's receive buffers into
// a recycled buffer, and written from there.
//
// ListFlights lists the datasets (a criteria expression keeps the names
// with that prefix), GetFlightInfo describes one (schema, total records and
// bytes, one endpoint whose ticket is "datasets/NAME") and DoGet streams it
// back in the record batches it was put in, bit for bit, but for one case:
// a dictionary-encoded column whose dictionary changes between batches (as
// pyarrow sends a table concatenated from tables of other categories),
// which an Arrow IPC file cannot hold, is stored with one dictionary
// unified over the stream (indices widened when the categories outgrow
// their type), so that DoGet returns the same values, still
// dictionary-encoded. A dictionary nested in another type that changes is
// UNIMPLEMENTED. Data the IPC writer refuses is never INTERNAL.
//
// # Inference
//
// DoExchange with the path descriptor ["models", NAME] or ["models", NAME,
// VERSION] (the highest serving version when omitted) reads record batches
// of inputs and answers each with one record batch of predictions, in
// order, echoing the input batch's app_metadata. Input batches are
// pipelined (up to four in flight per stream, their bytes held in the
// server's in-flight memory gate until answered): while one batch runs
// through the model, the next ones are received and decoded and the
// previous answer is written. Each batch runs whole, as one execution on
// one of the version's instances, queued with the gRPC requests in its
// dynamic batcher but never cut into max_batch_size requests nor merged
// (batcher.Batcher.ForwardTensors); the version's statistics count it.
//
// An input is the column named as the model input, of exactly the input's
// datatype, holding one value per row: a numeric column for an input with
// dims [] or [1], a FixedSizeList of numbers for dims [k], or an
// arrow.fixed_shape_tensor whose logical shape is the input's dims, -1
// matching any size. A fixed_shape_tensor with a permutation (as pyarrow
// writes a non-C-contiguous ndarray) is its logical tensor: its rows are
// copied once into logical row-major order. For a model without batching
// (max_batch_size 0) the rows of the batch are the input's first dimension
// and the column gives the rest. Nulls are refused.
//
// Feature stacking: when the model has exactly one input, whose per-row
// dims are [k] (or [-1]), and the batch has no column of that name, numeric
// columns are stacked into the input's [rows, k] features: the columns the
// schema metadata "kiln.features" names (a JSON array or a comma-separated
// list), in that order, or else every column of the schema in schema
// order, which must then number exactly k. Every stacked column must have
// the input's datatype; stacking copies the values once.
//
// Each model output becomes a column named after it: a numeric column for
// outputs with one value per row, a fixed_shape_tensor of the per-row shape
// otherwise. Outputs must have one row per input row, and one shape for the
// whole stream.
//
// Copies: the server's gRPC codec receives each record batch body once,
// from gRPC's buffers into recycled C memory (malloc'd, 64-byte aligned);
// an input column there (one column, no permutation: any column arrow-go
// decoded without compression) becomes the model's input tensor without a
// copy, sharing the Arrow buffer, slices at their offset included. Other
// inputs (permuted tensors, stacked features, compressed bodies) are
// copied once into C memory. The answer's columns are the model's output
// memory, sent without a copy: the FlightData references the buffers until
// gRPC has written them.
//
// Errors end the stream with a status: INVALID_ARGUMENT for a descriptor,
// schema or batch that does not fit the model (missing input columns, wrong
// datatypes or shapes, nulls, malformed IPC), NOT_FOUND for an unknown model
// or version, UNAVAILABLE for a model that does not serve, INTERNAL for a
// failed model execution. The server keeps serving other calls.
//
// # Training jobs
//
// DoAction `train` with a JSON body {"dataset": NAME, ...} starts a job that
// runs the configured Trainer on the dataset's file in the background and
// returns {"job_id": ID}; `job-status` and `cancel` take the id (bare, as a
// JSON string or as {"job_id": ID}) and return the job's JobStatus JSON,
// with its progress; `list-jobs` returns them all. Without a Trainer these
// actions fail with UNIMPLEMENTED. A Trainer that is a TrainChecker
// (ModelTrainer is) checks the body against the dataset first: a request
// that cannot succeed (unknown fields, no layers, a missing or unusable
// target or feature column, an invalid model name, checkpoint options)
// fails the action with INVALID_ARGUMENT, an unknown dataset with
// NOT_FOUND, and no job starts. ModelTrainer is Kiln's trainer (core/train
// on the dataset read with arrowio.ReadTable): its `train` body is a
// TrainRequest (dataset, target, an inline `kiln train` spec, hyper-parameter
// overrides, the model name), and it writes the trained model package as the
// next version of a model repository, with a config.yaml the serving
// repository accepts, reporting epochs, loss and validation metrics as
// progress. The package is written in a hidden staging directory at the
// top of the repository and installed with repository.Install: a job that
// fails or is cancelled leaves nothing in the repository.
//
// # Pipelines
//
// DoAction `pipeline_run` with a pipeline file (YAML, package pipeline) as
// its body checks the file before any work through Options.Pipelines (a
// bad file fails the action with INVALID_ARGUMENT naming the line and the
// field; data that does not fit too), records the run and carries it out
// as a job of the same registry as `train`: the result is {"job_id": ID,
// "run_id": RUN}, and `job-status`, `cancel` and `list-jobs` follow it
// (JobStatus.RunID; the progress is the stage, step of 7). Without
// Options.Pipelines the action is UNIMPLEMENTED. Options.OnDatasetCommitted
// is called after every committed DoPut (continuous training watches a
// dataset with it).
//
// # Security
//
// Options.Auth is the server's one authentication policy (serving/auth,
// the same as gRPC's and HTTP's): with a token or users, datasets and
// actions need a bearer token, static or issued by the Flight basic-auth
// handshake, and DoExchange needs one when the policy protects inference.
// Options.TLSConfig or CertFile and KeyFile serve TLS.
package flightserver
